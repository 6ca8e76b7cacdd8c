"""Writing outputs so that nothing is half-written, nothing is lost and nothing odd is replaced.

- Every file is written under a temporary name in its own folder and renamed into place, so a reader
  never sees a partial file. Temporary names carry the host and the process id
  (`.NAME.tmp-HOST-PID-TOKEN`); a temporary left by a process that died (kill -9, power loss) is
  recognised by its dead pid and removed by the next write into that folder. It is never read: no
  reader opens dot-names, and a run file also needs its `complete` mark.
- A set of files that belong together (summary.json, junit.xml, report.html) is written whole into a
  temporary folder first; only then are the old files removed and the new ones renamed in, with the
  "marker" file (summary.json) removed first and renamed in last: at no moment do files of two runs
  sit side by side, and whenever the marker exists its companions are complete.
- An existing output that is not a regular file (a FIFO, a device, a folder, a symlink) is refused.
- New files are created with mode 0666 less the umask (0644 normally), like any other tool's output.
- OSErrors become OutputError with a message that names the cause (full disk, read-only, permission).
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import Mapping

from sd_parity.errors import OutputError
from sd_parity.interrupts import critical

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
# .NAME.tmp-PID (older writers), .NAME.tmp-HOST-PID or .NAME.tmp-HOST-PID-TOKEN
_TEMP_RE = re.compile(r"^\..+\.tmp-(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)(?:-[0-9a-f]+)?$")
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
    errno.EFBIG: "the file is too large for the file system",
    errno.ENAMETOOLONG: "the name is too long",
}
# errno values that mean "the environment or the path given is wrong", not a bug: exit 2, not 3
ENVIRONMENT_ERRNOS = frozenset(_REASONS) | {errno.ELOOP, errno.EEXIST, errno.EXDEV, errno.EIO, errno.EBUSY}


_TEMPORARIES: set[Path] = set()  # what this process is writing now: removed on a signal (sd_parity.interrupts)


def temp_path(path: Path) -> Path:
    """A new temporary name for `path`, in the same folder (so the final rename is atomic), registered for
    removal on a signal until `release_temporary`."""
    temporary = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    _TEMPORARIES.add(temporary)
    return temporary


def release_temporary(path: Path) -> None:
    """`path` was renamed into place or removed: no longer this process's to remove."""
    _TEMPORARIES.discard(path)


def remove_temporaries() -> None:
    """Remove every temporary this process is writing (called on a signal: no locks, no exceptions)."""
    for path in list(_TEMPORARIES):
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError:
            pass


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` left by dead processes of this host; return what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_RE.match(name)
        if match is None or match["host"] not in (None, _HOST) or _alive(int(match["pid"])):
            continue
        path = folder / name
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
        except OSError:
            pass  # another process got there first, or the folder is read-only: harmless
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or not a pid: leave it
    return True


def check_output_file(path: Path, option: str = "output") -> None:
    """Refuse an output path that exists and is not a regular file, or whose folder is missing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise output_error(exc, path) from exc
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{option} {path} exists and is {_kind(mode)}, not a regular file; it is left alone: "
                          "remove it or choose another path")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: folder {parent} does not exist; create it or choose another path")


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def output_error(exc: OSError, path: Path | str) -> OutputError:
    reason = _REASONS.get(exc.errno, exc.strerror or str(exc))
    advice = ("free some space or choose another output folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
              else "choose another output path")
    return OutputError(f"cannot write {path}: {reason}; {advice}")


def _create(path: Path) -> int:
    # O_EXCL on a fresh temporary name; mode 0666 less the umask, like any other tool's output
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def _write_file(path: Path, content: str | bytes) -> None:
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd = _create(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write one file through a temporary name; on any failure the old file is untouched."""
    path = Path(path)
    check_output_file(path)
    sweep_stale_temps(path.parent)
    tmp = temp_path(path)
    try:
        _write_file(tmp, content)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(exc, path) from exc
        raise
    finally:
        release_temporary(tmp)
    return path


def write_set(folder: str | os.PathLike, files: Mapping[str, str | bytes], marker: str) -> list[Path]:
    """Replace the files of one output set in `folder` as a unit (see the module docstring).

    `files` maps a file name to its text or bytes; `marker` (one of the names) is removed first and
    renamed in last."""
    folder = Path(folder)
    if marker not in files:
        raise ValueError(f"marker {marker!r} is not one of the files {list(files)}")
    targets = {name: folder / name for name in files}
    for path in targets.values():
        check_output_file(path, "output")
    sweep_stale_temps(folder)
    staging = temp_path(folder / ".parity-outputs")
    try:
        os.mkdir(staging)
        for name, content in files.items():
            _write_file(staging / name, content)
        order = [marker] + [n for n in files if n != marker]
        with critical():
            for name in order:
                targets[name].unlink(missing_ok=True)
            for name in reversed(order):
                os.replace(staging / name, targets[name])
    except OSError as exc:
        raise output_error(exc, folder) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        release_temporary(staging)
    return [targets[name] for name in files]
