"""Shell-style name patterns, matched without regular expressions (sans-io).

Theory of operation
-------------------
Watch patterns come from peers, so matching them must cost nothing a peer can multiply: no
regular-expression compilation (``fnmatch.translate`` of ``*a*a*a…`` takes tens of
milliseconds and fills ``re``'s cache), no cache that grows with distinct patterns, and no
backtracking.  A :class:`Glob` is parsed once, in time linear in its length, into the
*segments* between its stars.  A name matches when the first segment matches at its start,
the last at its end, and every middle segment, left to right, at the leftmost place it fits
after the previous one.  Leftmost placement is always right for globs (a star can absorb
whatever a later placement would have skipped), so nothing is ever retried: a match is one
left-to-right pass, each segment found with ``str.find``/``startswith`` when it is plain text.

Syntax: ``*`` any run of characters (also none), ``?`` any one character, ``[abc]``,
``[a-z]``, ``[!abc]`` one character from (or not from) a set; everything else stands for
itself.  An unclosed ``[`` is an error (:class:`GlobError`), not a literal.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Glob", "GlobError", "compile_glob"]


class GlobError(ValueError):
    """A pattern that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class _Set:
    negated: bool
    chars: frozenset[str]
    ranges: tuple[tuple[str, str], ...]

    def accepts(self, ch: str) -> bool:
        inside = ch in self.chars or any(lo <= ch <= hi for lo, hi in self.ranges)
        return inside != self.negated


# One position of a segment: a literal character, None for ``?``, or a set.
_Atom = str | None | _Set


@dataclass(frozen=True, slots=True)
class _Segment:
    atoms: tuple[_Atom, ...]
    text: str | None  # the segment as plain text, when it has no ``?`` and no set

    def __len__(self) -> int:
        return len(self.atoms)

    def matches_at(self, name: str, pos: int) -> bool:
        if self.text is not None:
            return name.startswith(self.text, pos)
        if pos + len(self.atoms) > len(name):
            return False
        for i, atom in enumerate(self.atoms):
            ch = name[pos + i]
            if atom is None:
                continue
            if type(atom) is str:
                if atom != ch:
                    return False
            elif not atom.accepts(ch):  # type: ignore[union-attr]
                return False
        return True

    def find(self, name: str, start: int, end: int) -> int:
        """The leftmost position ``p >= start`` where the segment fits inside ``name[:end]``."""
        if self.text is not None:
            return name.find(self.text, start, end)
        last = end - len(self.atoms)
        for pos in range(start, last + 1):
            if self.matches_at(name, pos):
                return pos
        return -1


@dataclass(frozen=True, slots=True)
class Glob:
    pattern: str
    segments: tuple[_Segment, ...]
    starred: bool  # at least one ``*``: segments[0] is anchored at the start, [-1] at the end

    def match(self, name: str) -> bool:
        segments = self.segments
        if not self.starred:
            only = segments[0]
            return len(name) == len(only) and only.matches_at(name, 0)
        head, tail = segments[0], segments[-1]
        end = len(name) - len(tail)
        if end < len(head) or not head.matches_at(name, 0) or not tail.matches_at(name, end):
            return False
        pos = len(head)
        for segment in segments[1:-1]:
            found = segment.find(name, pos, end)
            if found < 0:
                return False
            pos = found + len(segment)
        return True


def _parse_set(pattern: str, i: int) -> tuple[_Set, int]:
    """Parse ``[...]`` starting after the ``[`` at ``i - 1``; returns the set and the next index."""
    negated = i < len(pattern) and pattern[i] == "!"
    if negated:
        i += 1
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
    first = True
    while i < len(pattern):
        ch = pattern[i]
        if ch == "]" and not first:
            return _Set(negated, frozenset(chars), tuple(ranges)), i + 1
        first = False
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            lo, hi = ch, pattern[i + 2]
            if lo > hi:
                raise GlobError(f"pattern {pattern[:64]!r}: range {lo}-{hi} is backwards")
            ranges.append((lo, hi))
            i += 3
        else:
            chars.add(ch)
            i += 1
    raise GlobError(f"pattern {pattern[:64]!r}: '[' is never closed")


def compile_glob(pattern: str) -> Glob:
    """Parse ``pattern``; raises :class:`GlobError` for an unclosed ``[`` or a backwards range."""
    segments: list[_Segment] = []
    atoms: list[_Atom] = []
    starred = False

    def close_segment() -> None:
        plain = all(type(a) is str for a in atoms)
        text = "".join(a for a in atoms if type(a) is str) if plain else None
        segments.append(_Segment(tuple(atoms), text))
        atoms.clear()

    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            starred = True
            close_segment()
            while i < len(pattern) and pattern[i] == "*":
                i += 1  # a run of stars is one star
            continue
        if ch == "?":
            atoms.append(None)
        elif ch == "[":
            parsed, i = _parse_set(pattern, i + 1)
            atoms.append(parsed)
            continue
        else:
            atoms.append(ch)
        i += 1
    close_segment()
    return Glob(pattern, tuple(segments), starred)
