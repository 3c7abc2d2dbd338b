"""Local files that decide whom minibus trusts: who owns them, who may change them, and how
they are written.

Theory of operation
-------------------
A file another local user can plant or change is as good as a key they hold: a planted
address file sends a client's calls to their broker, a writable ``authorized_keys`` lets
their key in, a symlink planted where busd writes makes busd write through it.  So every
file minibus trusts is checked on the object actually used (``lstat`` for directories,
``fstat`` of the opened file), never by a path looked up a second time:

* **the runtime directory** (socket and address file) follows the XDG rule: a real directory,
  not a symlink, owned by the current user, mode exactly 0700.  busd creates it with
  ``mkdir(0700)`` and checks it again by ``lstat`` afterwards, whoever won a race to create it;
* **secret files** (identities) belong to the current user and have no group or other bits;
* **trusted files** that hold no secret (the config, ``authorized_keys``, the address file)
  belong to the current user or root and are writable by nobody else; others may read them;
* **temporary files** get a random name and are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``
  and mode 0600, so a name planted in advance is never followed or reused, then renamed
  over their final name.

Every refusal is a :class:`LocalFileError` whose message is one line naming the path, the
reason, and the fix; callers turn it into their own error (``InsecureKeyFile``, a busd
configuration error, ``CannotConnect``).

Blocking file I/O, no network I/O: this module belongs to the sans-io wire layer.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from ..errors import BusError

__all__ = [
    "LocalFileError",
    "check_file_stat",
    "read_trusted_file",
    "check_private_dir",
    "ensure_private_dir",
    "check_owned_dir",
    "create_temp_file",
    "replace_file",
]

_ROOT = 0


class LocalFileError(BusError):
    """A local file or directory minibus will not use: wrong owner, loose mode, a symlink,
    the wrong kind of file, or too large."""


def _you() -> str:
    return f"uid {os.getuid()}"


def check_file_stat(st: os.stat_result, path: str | os.PathLike[str], what: str, *, secret: bool) -> None:
    """Refuse a file that others could have planted or changed.

    ``secret``: the current user's alone, no group or other bits at all (key files).
    Otherwise: the current user's or root's, and writable by nobody else (readable is fine).
    """
    if not stat.S_ISREG(st.st_mode):
        raise LocalFileError(f"{path}: {what} is not a regular file")
    uid = os.getuid()
    mode = stat.S_IMODE(st.st_mode)
    if secret:
        if st.st_uid != uid:
            raise LocalFileError(f"{path}: {what} belongs to uid {st.st_uid}, not to you ({_you()})")
        if mode & 0o077:
            raise LocalFileError(
                f"{path}: {what} is accessible by group or others (mode {mode:04o}); fix it with 'chmod 600 {path}'"
            )
        return
    if st.st_uid not in (uid, _ROOT):
        raise LocalFileError(f"{path}: {what} belongs to uid {st.st_uid}, not to you ({_you()}) or root")
    if mode & 0o022:
        raise LocalFileError(
            f"{path}: {what} is writable by group or others (mode {mode:04o}); fix it with 'chmod go-w {path}'"
        )


def read_trusted_file(
    path: str | os.PathLike[str],
    what: str,
    *,
    secret: bool = False,
    follow_symlinks: bool = True,
    max_bytes: int = 1 << 20,
) -> bytes:
    """Open ``path``, check the opened file with :func:`check_file_stat`, and read it whole.

    A FIFO planted at the path cannot block the open (``O_NONBLOCK``); with
    ``follow_symlinks=False`` a symlink at the path is refused (``O_NOFOLLOW``).
    A missing file raises :class:`FileNotFoundError`, other failures to open :class:`OSError`.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_symlinks and exc.errno == errno.ELOOP:
            raise LocalFileError(f"{path}: {what} is a symlink; refusing to follow it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        check_file_stat(os.fstat(fd), path, what, secret=secret)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LocalFileError(f"{path}: {what} is larger than {max_bytes} bytes")
    return data


def _dir_kind_problem(st: os.stat_result, path: Path, what: str) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return f"{path}: {what} is a symlink, not a directory of your own"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path}: {what} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path}: {what} belongs to uid {st.st_uid}, not to you ({_you()})"
    return None


def check_private_dir(path: Path, what: str = "runtime directory") -> None:
    """The XDG rule, checked with ``lstat``: a real directory, ours, mode exactly 0700.

    Raises :class:`FileNotFoundError` when it does not exist.
    """
    st = os.lstat(path)
    problem = _dir_kind_problem(st, path, what)
    if problem is not None:
        # Another user may have created it first; only root or they can remove it.
        raise LocalFileError(f"{problem}; remove it, or use another (set XDG_RUNTIME_DIR or --runtime-dir)")
    mode = stat.S_IMODE(st.st_mode) & 0o777
    if mode != 0o700:
        raise LocalFileError(f"{path}: {what} has mode {mode:04o}, must be 0700; fix it with 'chmod 700 {path}'")


def ensure_private_dir(path: Path, what: str = "runtime directory") -> None:
    """Create ``path`` with mode 0700 when it is missing (its parents as needed), then check it
    with :func:`check_private_dir`, whoever created it."""
    try:
        check_private_dir(path, what)
        return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # lost a race: the check below decides whether what is there will do
    check_private_dir(path, what)


def check_owned_dir(path: Path, what: str = "directory") -> None:
    """A directory whose files we may trust: a real directory (``lstat``), ours, writable by
    nobody else.  Raises :class:`FileNotFoundError` when it does not exist."""
    st = os.lstat(path)
    problem = _dir_kind_problem(st, path, what)
    if problem is not None:
        raise LocalFileError(problem)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise LocalFileError(
            f"{path}: {what} is writable by group or others (mode {mode:04o}); fix it with 'chmod go-w {path}'"
        )


def _random_suffix() -> str:
    return secrets.token_hex(8)


def create_temp_file(final: Path) -> tuple[int, Path]:
    """A new, empty file beside ``final``, named ``.<name>.<random>.tmp``, open for writing.

    Created with ``O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600: a file or symlink
    planted at the name makes this fail (:class:`FileExistsError`) rather than write through it.
    The caller owns the returned descriptor and the file.
    """
    tmp = final.with_name(f".{final.name}.{_random_suffix()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600), tmp


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file (see :func:`create_temp_file`) and rename it
    over ``path``, so readers see the old content or the new, never half of it.  The file is
    mode 0600.  Check the directory first (:func:`ensure_private_dir`)."""
    fd, tmp = create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
