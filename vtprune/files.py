"""Opening the user's files: every file-system problem becomes one `VtpruneError` naming the path.

Each function takes `what` ("image", "pruning config", "input file", ...) for the message, e.g.
`input file /data/req.jsonl: permission denied`. Only regular files are opened: a FIFO or a
device would block or never end, so they are refused from `stat`, before any `open`.
Text files must be UTF-8; JSON and YAML are parsed here (YAML with `safe_load` only).
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from .errors import VtpruneError

_REASONS = {
    errno.ENOENT: "not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a parent of it is not a directory",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}


def os_error_reason(e: OSError) -> str:
    """'permission denied', 'is a directory', ... for an OSError (its strerror otherwise)."""
    if e.errno in _REASONS:
        return _REASONS[e.errno]
    return (e.strerror or str(e)).lower()


def fs_error(what: str, path, e: OSError) -> VtpruneError:
    return VtpruneError(f"{what} {os.fspath(path)}: {os_error_reason(e)}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file; refused (it could block forever)"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def check_file(path, what: str) -> str:
    """`path` as a str if it names an existing regular file (symlinks followed), else the error."""
    if not isinstance(path, (str, os.PathLike)):
        raise VtpruneError(f"{what}: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise VtpruneError(f"{what}: empty path")
    if "\x00" in path:
        raise VtpruneError(f"{what} {path!r}: the path contains a NUL byte")
    try:
        st = os.stat(path)
    except OSError as e:
        raise fs_error(what, path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise VtpruneError(f"{what} {path}: {_kind(st.st_mode)}")
    return path


def check_dir(path, what: str) -> str:
    """`path` as a str if it names an existing, readable directory, else the error."""
    if not isinstance(path, (str, os.PathLike)):
        raise VtpruneError(f"{what}: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise VtpruneError(f"{what}: empty path")
    if "\x00" in path:
        raise VtpruneError(f"{what} {path!r}: the path contains a NUL byte")
    try:
        st = os.stat(path)
    except OSError as e:
        raise fs_error(what, path, e) from None
    if not stat.S_ISDIR(st.st_mode):
        raise VtpruneError(f"{what} {path}: is not a directory")
    try:
        os.listdir(path)
    except OSError as e:
        raise fs_error(what, path, e) from None
    return path


def check_readable(path, what: str) -> str:
    """check_file, and the file can be opened for reading (permission denied is reported here,
    before any slow work; the file is opened only once it is known to be a regular file)."""
    path = check_file(path, what)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise fs_error(what, path, e) from None
    return path


def read_bytes(path, what: str, limit: int | None = None) -> bytes:
    """The file's bytes (a regular file only); `limit`: refuse files larger than that many bytes."""
    f = open_regular(path, what)
    try:
        with f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        raise fs_error(what, path, e) from None
    if limit is not None and len(data) > limit:
        raise VtpruneError(f"{what} {path}: larger than {limit} bytes")
    return data


def decode_utf8(data: bytes, what: str, path, line: int | None = None) -> str:
    """`data` as UTF-8 text, else the error naming the line; `line`: `data` is that one line of
    the file (from iter_lines), and the error names it and the byte's column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is not None:
            raise VtpruneError(f"{what} {os.fspath(path)}, line {line}: not UTF-8 text (byte "
                               f"0x{data[e.start]:02x} at column {e.start + 1})") from None
        line = data[: e.start].count(b"\n") + 1
        raise VtpruneError(f"{what} {os.fspath(path)}: not UTF-8 text (byte 0x{data[e.start]:02x} on line "
                           f"{line})") from None


def read_text(path, what: str) -> str:
    """The file as UTF-8 text (a BOM is dropped)."""
    text = decode_utf8(read_bytes(path, what), what, path)
    return text[1:] if text.startswith("\ufeff") else text


def read_json(path, what: str):
    import json

    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise VtpruneError(f"{what} {os.fspath(path)}: not valid JSON ({e.msg} at line {e.lineno}, "
                           f"column {e.colno})") from None
    except RecursionError:
        raise VtpruneError(f"{what} {os.fspath(path)}: JSON nested too deeply") from None


def read_yaml(path, what: str):
    """`yaml.safe_load` of the file: plain data only, never Python objects."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise VtpruneError(f"{what} {os.fspath(path)}: not valid YAML ({msg})") from None
    except RecursionError:
        raise VtpruneError(f"{what} {os.fspath(path)}: YAML nested too deeply") from None


def open_regular(path, what: str, mode: str = "rb"):
    """A binary file object on `path` ("rb"; "ab": append, created if missing; "r+b"), a regular
    file only, or the error. Opened with O_NONBLOCK and checked again with `fstat`, so that a file
    swapped for a FIFO between the `stat` and the `open` is refused too instead of blocking."""
    flags = {"rb": os.O_RDONLY, "ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "r+b": os.O_RDWR}[mode]
    path = check_file(path, what) if mode != "ab" or os.path.exists(path) else os.fspath(path)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise fs_error(what, path, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VtpruneError(f"{what} {path}: {_kind(st.st_mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def iter_lines(path, what: str, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes without the newline) of a regular file, streamed; blank lines skipped.
    Lines are bytes so that one line that is not UTF-8 can be reported alone (`decode_utf8`).
    With `max_line_bytes`, a longer line is skipped without being held in memory and yielded as
    (line number, None)."""
    f = open_regular(path, what)
    with f:
        n = 0
        while True:
            try:
                raw = f.readline() if max_line_bytes is None else f.readline(max_line_bytes + 1)
                too_long = max_line_bytes is not None and len(raw) > max_line_bytes and not raw.endswith(b"\n")
                while too_long and raw and not raw.endswith(b"\n"):  # the rest of the line, in bounded pieces
                    raw = f.readline(1 << 20)
            except OSError as e:
                raise fs_error(what, path, e) from None
            if not raw and not too_long:
                return
            n += 1
            if too_long:
                yield n, None
                if not raw:
                    return
                continue
            raw = raw.rstrip(b"\r\n")
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                yield n, raw


def same_file(a, b) -> bool:
    """Whether two paths name the same file (links and symlinks included); False if either is absent."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path, what: str, inputs: dict | None = None, parents: bool = False) -> str:
    """`path` as a str if a file can be written there: its directory exists, it is not a directory
    or a special file, it is writable, and it is none of `inputs` ({what: path}), so that writing
    it cannot destroy them. `parents`: its directory may be missing if it can be created
    (check_output_dir). Nothing is created."""
    if not isinstance(path, (str, os.PathLike)):
        raise VtpruneError(f"{what}: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise VtpruneError(f"{what}: empty path")
    for name, other in (inputs or {}).items():
        if other is not None and (same_file(path, other)
                                  or os.path.abspath(path) == os.path.abspath(os.fspath(other))):
            raise VtpruneError(f"{what} {path} is the {name} ({os.fspath(other)}): refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if parents:
        check_output_dir(parent, what, _file=path)
        if not os.path.isdir(parent):
            return path  # it will be created, empty
    try:
        st = os.stat(parent)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise VtpruneError(f"{what} {path}: a parent of it is a file, not a directory") from None
        raise fs_error(f"{what}'s directory", parent, e) from None
    if not stat.S_ISDIR(st.st_mode):
        raise VtpruneError(f"{what} {path}: its parent {parent} is not a directory")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise VtpruneError(f"{what} {path}: directory {parent}: permission denied") from None
        return path
    except OSError as e:
        raise fs_error(what, path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise VtpruneError(f"{what} {path}: {_kind(st.st_mode)}")
    if not os.access(path, os.W_OK):
        raise VtpruneError(f"{what} {path}: permission denied")
    return path


def check_output_dir(path, what: str, _file: str | None = None) -> str:
    """`path` as a str if it is a writable directory or one that can be created: nothing in the
    way is a file, and its nearest existing ancestor is a writable directory. Nothing is created,
    so a job can check its output before slow work and fail without leaving anything behind.
    (`_file`: the output file that will be written in it, named in the errors instead.)"""
    if not isinstance(path, (str, os.PathLike)):
        raise VtpruneError(f"{what}: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise VtpruneError(f"{what}: empty path")
    if "\x00" in path:
        raise VtpruneError(f"{what} {path!r}: the path contains a NUL byte")
    named = f"{what} {_file if _file is not None else path}"
    target = here = os.path.abspath(path)
    while True:  # up to the nearest ancestor that exists
        try:
            st = os.stat(here)
            break
        except (FileNotFoundError, NotADirectoryError) as e:
            if isinstance(e, FileNotFoundError) and os.path.lexists(here):  # makedirs would fail on it
                raise VtpruneError(f"{named}: {here} is a broken symbolic link") from None
            up = os.path.dirname(here)
            if up == here:
                raise VtpruneError(f"{named}: not found") from None
            here = up
        except OSError as e:
            raise fs_error(what, _file if _file is not None else path, e) from None
    if not stat.S_ISDIR(st.st_mode):
        if here == target and _file is None:
            raise VtpruneError(f"{named}: exists and is not a directory")
        raise VtpruneError(f"{named}: a parent of it ({here}) is a file, not a directory")
    if not os.access(here, os.W_OK | os.X_OK):
        raise VtpruneError(f"{named}: directory {here}: permission denied")
    return path


def make_output_dir(path, what: str) -> str:
    """Create directory `path` (and its parents) if needed; one error if it cannot be."""
    if not isinstance(path, (str, os.PathLike)):
        raise VtpruneError(f"{what}: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise VtpruneError(f"{what}: empty path")
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise VtpruneError(f"{what} {path}: exists and is not a directory") from None
    except NotADirectoryError:
        raise VtpruneError(f"{what} {path}: a parent of it is a file, not a directory") from None
    except OSError as e:
        raise fs_error(what, path, e) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise VtpruneError(f"{what} {path}: permission denied")
    return path


def open_binary(path, what: str):
    """`path` opened for reading bytes, a regular file only (`open_regular(path, what, "rb")`)."""
    return open_regular(path, what, "rb")
