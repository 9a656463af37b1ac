"""Local output directories, written atomically: a temporary sibling renamed at the end."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from functools import cache
from pathlib import Path

from merge_service.errors import Problem
from merge_service.sources.resolve import WEIGHT_SUFFIXES

log = logging.getLogger(__name__)

# Files of the base that describe the model but are not weights; our card replaces README.md.
_SKIP_NAMES = {"README.md", ".gitattributes"}

# A sibling whose owner cannot be checked (another host, an older name) is stale once nothing
# in it changed for this long: a running merge writes its shards far more often.
STALE_AFTER_S = 3600.0

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
# renameat2 missing (old kernel, seccomp), or the file system cannot exchange: two renames
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def destination_problems(destination: Path, overwrite: bool) -> list[Problem]:
    """Can the output be written there? Checked at preflight, before any heavy work.

    Siblings an interrupted run left are settled first (`recover_interrupted`): a previous
    output it had moved aside is the destination again, as the checks below should see it.
    """
    try:
        return _destination_problems(destination, overwrite)
    except OSError as exc:  # a name too long for the file system, a path through a socket...
        return [Problem(f"cannot use destination {destination}: {exc.strerror or exc}",
                        field="output.destination")]


def _destination_problems(destination: Path, overwrite: bool) -> list[Problem]:
    recover_interrupted(destination)
    if destination.is_dir() and os.path.ismount(destination):
        # the output is written beside it and renamed over it, which a mount point refuses
        # (EBUSY) only after the whole merge
        return [Problem(f"destination {destination} is a mount point and cannot be replaced: "
                        "write to a directory inside it, or mount its parent instead",
                        field="output.destination")]
    if destination.exists() and not overwrite:
        return [Problem(f"destination {destination} already exists (an output is replaced "
                        "only with the command line's `--overwrite`; a job never replaces one)",
                        field="output.destination")]
    if destination.exists() and not destination.is_dir():
        return [Problem(f"destination {destination} is a file", field="output.destination")]
    parent = destination.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [Problem(f"cannot create {destination}: {parent} is not a directory",
                        field="output.destination")]
    try:  # tried, not asked: root passes every permission check, and /proc refuses anyway
        Path(tempfile.mkdtemp(prefix=f".{destination.name}.probe-", dir=parent)).rmdir()
    except OSError as exc:
        return [Problem(f"cannot create {destination}: {parent} is not writable "
                        f"({exc.strerror or exc})", field="output.destination")]
    return []


@cache
def _host_tag() -> str:
    """Where a pid means the same process: this host, pid namespace (containers sharing a
    volume, even with one hostname) and boot (pids start over after a reboot)."""
    where = [socket.gethostname()]
    for name in ("/proc/self/ns/pid", "/proc/sys/kernel/random/boot_id"):
        with contextlib.suppress(OSError):
            where.append(os.readlink(name) if name.endswith("pid") else Path(name).read_text())
    return hashlib.sha1("\0".join(where).encode()).hexdigest()[:8]


def _sibling(destination: Path, kind: str) -> Path:
    """`.NAME.partial-HOST-PID-RANDOM`: whoever finds it later can tell whether we still run."""
    return destination.parent / (f".{destination.name}.{kind}-{_host_tag()}-{os.getpid()}-"
                                 f"{uuid.uuid4().hex[:8]}")


def remove_partials_of(destination: Path, pid: int, this_host: bool) -> None:
    """Remove the temporary outputs beside `destination` of the merge process `pid` (on this
    host when `this_host`, on whichever otherwise): an attempt known to be dead or abandoned.
    The temporaries of other merges to the same destination, running ones too, stay."""
    prefix = f".{destination.name}.partial-"
    try:
        entries = list(destination.parent.iterdir())
    except OSError:
        return
    for path in entries:
        if not path.name.startswith(prefix):
            continue
        tag, _, rest = path.name.removeprefix(prefix).partition("-")
        if rest.split("-")[0] == str(pid) and (not this_host or tag == _host_tag()):
            log.info("removing %s, left by an interrupted attempt", path)
            shutil.rmtree(path, ignore_errors=True)


def _owner_alive(path: Path, kind: str, destination: Path) -> bool | None:
    """Whether the process named in the sibling runs; None when this host cannot tell."""
    parts = path.name.removeprefix(f".{destination.name}.{kind}-").split("-")
    if (os.name != "posix"  # elsewhere os.kill(pid, 0) is no probe
            or len(parts) != 3 or parts[0] != _host_tag() or not parts[1].isdigit()):
        return None
    pid = int(parts[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _last_change(path: Path) -> float:
    """Newest mtime/ctime of the directory and anything in it (a rename sets ctime)."""
    newest = 0.0
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            newest = max(newest, st.st_mtime, st.st_ctime)
    return newest


def _stale(path: Path, kind: str, destination: Path, stale_after_s: float) -> bool:
    alive = _owner_alive(path, kind, destination)
    if alive is not None:
        return not alive
    return time.time() - _last_change(path) > stale_after_s


def recover_interrupted(destination: Path, stale_after_s: float = STALE_AFTER_S) -> None:
    """Settle the siblings a killed run (SIGKILL, power loss) left beside the destination.

    A `.partial-*` is a half-written output: removed. An `.old-*` is a previous output moved
    aside for a replace: restored when the destination is missing (the newest, if several),
    else removed. Only siblings whose owner is gone are touched: on this host the pid in the
    name tells; otherwise (another host, an older name) nothing changed in it for
    `stale_after_s`. A merge to the same destination running now keeps its own.
    """
    parent = destination.parent
    if not parent.is_dir():
        return
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    partials = [p for p in entries if p.name.startswith(f".{destination.name}.partial-")]
    olds = [p for p in entries if p.name.startswith(f".{destination.name}.old-")]
    for path in partials:
        if _stale(path, "partial", destination, stale_after_s):
            log.info("removing %s, left by an interrupted merge", path)
            shutil.rmtree(path, ignore_errors=True)
    stale_olds = sorted((p for p in olds if _stale(p, "old", destination, stale_after_s)),
                        key=_last_change, reverse=True)
    if stale_olds and not os.path.lexists(destination):
        newest = stale_olds.pop(0)
        log.warning("restoring %s from %s: a replace of it was interrupted", destination,
                    newest)
        try:
            newest.rename(destination)
        except OSError as exc:
            log.warning("could not restore %s from %s: %s", destination, newest, exc)
            return  # keep the others: one of them may be all that is left of the output
    for path in stale_olds:
        log.info("removing %s, a replaced output an interrupted merge left", path)
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_by_renames(new: Path, destination: Path, old: Path) -> None:
    """Where no exchange is possible: move the destination aside to `old`, `new` into place.

    If anything fails in between (the second rename, Ctrl-C, SIGTERM) the previous output is
    moved back: the destination is never left empty by us. A SIGKILL there leaves `old`, which
    `recover_interrupted` restores.
    """
    destination.rename(old)
    try:
        new.rename(destination)
    except BaseException:
        old.rename(destination)
        raise


class LocalDirectorySink:
    """`with LocalDirectorySink(dest, overwrite) as tmp:` write into tmp; on success `commit()`.

    Leaving the block without commit (error, cancel) removes everything that was written.
    """

    def __init__(self, destination: Path, overwrite: bool = False) -> None:
        self.destination = destination
        self.overwrite = overwrite
        self.tmp = _sibling(destination, "partial")
        self._committed = False
        self._made: list[Path] = []  # parents this sink created, innermost first

    def __enter__(self) -> Path:
        parent = self.destination.parent
        while not parent.exists():
            self._made.append(parent)
            parent = parent.parent
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(self.destination)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        if not self.destination.exists():
            self.tmp.rename(self.destination)
            self._committed = True
            return
        if not self.overwrite:
            raise FileExistsError(f"destination {self.destination} appeared while merging")
        if _exchange(self.tmp, self.destination):
            old = self.tmp  # the previous output now lies where the new one was written
        else:
            old = _sibling(self.destination, "old")
            replace_by_renames(self.tmp, self.destination, old)
        self._committed = True
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for made in self._made:  # what it created for the output, if nothing else came
                try:
                    made.rmdir()
                except OSError:
                    break


def copy_model_files(source: Path, target: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of the base (subfolders included)."""
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if (not path.is_file() or path.suffix in WEIGHT_SUFFIXES or path.name in _SKIP_NAMES
                or any(part.startswith(".") for part in rel.parts)
                or path.name.endswith(".index.json")):
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / rel)
        copied.append(str(rel))
    return copied
