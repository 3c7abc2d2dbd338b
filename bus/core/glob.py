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

A middle segment that is not plain text (it holds ``?`` or a set) would have to be tried
at every position; such patterns are matched instead by a bit-parallel automaton
(:class:`GlobSet` runs all of a watch's complex patterns as one): one pass over the name,
a few integer operations per character, whatever the patterns hold.  Those *complex*
patterns are what a broker may want to count (see ``GlobSet.complex``).

Syntax: ``*`` any run of characters (also none), ``?`` any one character, ``[abc]``,
``[a-z]``, ``[!abc]`` one character from (or not from) a set; everything else stands for
itself.  An unclosed ``[`` is an error (:class:`GlobError`), not a literal.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Glob", "GlobError", "GlobSet", "compile_glob"]


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

    @property
    def complex(self) -> bool:
        """Whether a middle segment holds ``?`` or a set (it would need a search per position)."""
        return any(seg.text is None for seg in self.segments[1:-1])

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


class GlobSet:
    """Several patterns matched as one: plain ones with string searches, complex ones by one
    bit-parallel automaton (state bit *j* of a pattern: its first *j* tokens matched; each
    character of the name moves all states of all patterns at once)."""

    __slots__ = ("globs", "everything", "_plain", "_tokens", "_start", "_accept", "_star_loop", "_star_skip", "_masks")

    def __init__(self, globs: tuple[Glob, ...]) -> None:
        self.globs = globs
        #: A lone ``*`` (or a run of them): every name matches, nothing to look at.
        self.everything = any(g.starred and all(not seg.atoms for seg in g.segments) for g in globs)
        self._plain = tuple(g for g in globs if not g.complex)
        # Tokens of the complex patterns, one bit each, with one more bit per pattern for
        # "all matched": (absolute bit, atom or "*").
        self._tokens: list[tuple[int, _Atom | str]] = []
        start = accept = star_loop = star_skip = 0
        bit = 0
        for glob in globs:
            if not glob.complex:
                continue
            start |= 1 << bit
            tokens: list[_Atom | str] = []
            for i, segment in enumerate(glob.segments):
                if i:
                    tokens.append("*")
                tokens.extend(segment.atoms)
            for token in tokens:
                if token == "*":
                    star_skip |= 1 << bit  # a star may match nothing: state bit -> bit + 1
                    star_loop |= 1 << (bit + 1)  # ... or one more character: stay after it
                else:
                    self._tokens.append((bit, token))
                bit += 1
            accept |= 1 << bit
            bit += 1
        self._start = start
        self._accept = accept
        self._star_loop = star_loop
        self._star_skip = star_skip
        # Which tokens accept a character, worked out the first time it is seen (names use
        # at most 66 distinct characters, so this holds at most that many entries).
        self._masks: dict[str, int] = {}

    @property
    def complex(self) -> int:
        """How many of the patterns are complex (run by the automaton)."""
        return sum(1 for g in self.globs if g.complex)

    def _mask(self, ch: str) -> int:
        mask = 0
        for bit, atom in self._tokens:
            if atom is None or (type(atom) is str and atom == ch) or (type(atom) is _Set and atom.accepts(ch)):
                mask |= 1 << bit
        if len(self._masks) < 256:
            self._masks[ch] = mask
        return mask

    def match(self, name: str) -> bool:
        if self.everything:
            return True
        for glob in self._plain:
            if glob.match(name):
                return True
        if not self._start:
            return False
        skip, loop = self._star_skip, self._star_loop
        state = self._start
        state |= (state & skip) << 1
        masks = self._masks
        for ch in name:
            mask = masks.get(ch)
            if mask is None:
                mask = self._mask(ch)
            state = ((state & mask) << 1) | (state & loop)
            if not state:
                return False
            state |= (state & skip) << 1
        return bool(state & self._accept)
