"""Claiming a log file before writing it: one writer per file, clear errors for bad destinations.

Two :class:`~fastgrad.GradMonitor` s writing one ``gradients.jsonl`` would
splice their lines together (and the second one's ``"w"`` would truncate the
first one's steps). So a file logger takes a :class:`FileLock` on its file
before opening it: a small sibling file ``.<name>.lock`` holding the owner's
pid, host, command and start time, locked with ``flock`` (POSIX) for as long
as the logger is open.

* A second writer of the same file — in this process or another one on a
  filesystem where ``flock`` works — gets a RuntimeError naming the owner,
  before anything is opened or truncated.
* The lock is released by ``close()``; at interpreter exit, or when the
  logger is garbage-collected, its file is closed and then the lock released
  (``weakref.finalize``). A process that dies holding it (``kill -9``, a
  crash) releases the ``flock`` with it: the next writer finds the lock file
  left behind, warns that it takes over a stale lock from pid N, and goes on.
* Where ``flock`` is missing (Windows) the lock file is created exclusively
  instead; a lock left by a dead process must then be deleted by hand (the
  error says which file).

:func:`fresh_dir` claims a new directory atomically (``base``, ``base-2``,
...), for default run directories that must never be shared.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import warnings
import weakref

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# Lock files held by this process: realpath -> FileLock. flock already refuses a second
# lock from this process on local filesystems; the table gives the clearer message and
# covers filesystems that emulate flock with per-process locks.
_HELD: dict[str, FileLock] = {}
_HELD_MUTEX = threading.Lock()


def destination_error(e: OSError, path: str, what: str) -> OSError:
    """``e`` with a message that names the destination and says what to do (same OSError subclass)."""
    msg = (f"cannot write {what} at {path!r}: {e.strerror or e}"
           f"{f' ({e.filename!r})' if e.filename and os.fspath(e.filename) != path else ''}; "
           "give the GradMonitor (or logger) a writable run_dir, or loggers=() to write nothing")
    if e.errno is None:
        return OSError(msg)
    return type(e)(e.errno, msg)


def make_dirs(path: str, what: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` with :func:`destination_error` messages."""
    try:
        os.makedirs(path or ".", exist_ok=True)
    except OSError as e:
        raise destination_error(e, path, what) from e


def fresh_dir(base: str) -> str:
    """Create and return a new directory: ``base`` if it does not exist, else ``base-2``, ``base-3``, ...

    ``os.mkdir`` is atomic, so two callers racing for ``base`` get different directories.
    """
    parent = os.path.dirname(base)
    make_dirs(parent, "a run directory")
    for k in range(1, 10_000):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise destination_error(e, path, "a run directory") from e
    raise RuntimeError(f"no free directory name after {base}-9999")


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(rec: dict | None) -> str:
    if not rec:
        return "another writer (its lock file names no owner)"
    here = rec.get("host") == socket.gethostname()
    where = "this process" if here and rec.get("pid") == os.getpid() else f"process {rec.get('pid')}"
    host = "" if here else f" on host {rec.get('host')}"
    cmd = f" ({rec['command']})" if rec.get("command") else ""
    return f"{where}{host}{cmd}, since {rec.get('started', '?')}"


def _alive_elsewhere(rec: dict) -> bool:
    """Whether the owner ``rec`` names is another live process on this host (unknown hosts count as alive)."""
    if rec.get("host") != socket.gethostname():
        return True
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # POSIX only (this path needs fcntl): signal 0 checks existence
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        rec = json.loads(data.decode("utf-8")) if data.strip() else None
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


class FileLock:
    """An exclusive claim on ``target`` (a file path), kept in ``.<name>.lock`` beside it.

    Args:
        target: the file to be written.
        what: how errors name it (e.g. ``"gradients.jsonl"``).
    """

    def __init__(self, target: str, what: str = "this log file"):
        self.target = os.fspath(target)
        d, name = os.path.split(self.target)
        self.path = os.path.join(d, f".{name}.lock")
        self.what = what
        self._fd: int | None = None
        self._pid = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _refuse(self, rec: dict | None) -> RuntimeError:
        return RuntimeError(
            f"{self.what} at {self.target!r} is already being written by {_describe(rec)} "
            f"(lock file {self.path!r}). Two GradMonitors on one run_dir would interleave their lines: "
            "close() the other monitor first (or use `with GradMonitor(...) as m:`), or give this one "
            "another run_dir.")

    def acquire(self) -> FileLock:
        """Take the lock or raise RuntimeError naming its owner; a stale lock is taken over with a warning."""
        if self._fd is not None:
            return self
        key = os.path.realpath(self.path)
        with _HELD_MUTEX:
            other = _HELD.get(key)
            if other is not None and other.held:
                raise self._refuse(_owner_record() | {"started": other._started})
            fd = self._lock_fd()
            self._fd, self._pid, self._started = fd, os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S")
            _HELD[key] = self
        return self

    def _lock_fd(self) -> int:
        for _ in range(100):  # retried only when the lock file was replaced under us
            try:
                if fcntl is None:  # pragma: no cover - Windows
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                else:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileExistsError:  # pragma: no cover - Windows
                rec = None
                try:
                    with open(self.path, encoding="utf-8") as fh:
                        rec = json.loads(fh.read() or "null")
                except (OSError, ValueError):
                    pass
                err = self._refuse(rec if isinstance(rec, dict) else None)
                err.args = (err.args[0] + " If that process is gone, delete the lock file.",)
                raise err from None
            except OSError as e:
                raise destination_error(e, self.target, self.what) from e
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                            raise self._refuse(_read(fd)) from None
                        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                            raise
                        # A filesystem without flock: judge the recorded owner by whether it still runs.
                        rec = _read(fd)
                        if rec and _alive_elsewhere(rec):
                            raise self._refuse(rec) from None
                    # The holder may have unlinked the file between our open and our flock:
                    # then we locked a dead inode and must start again on the new file.
                    try:
                        st = os.stat(self.path)
                    except FileNotFoundError:
                        os.close(fd)
                        continue
                    mine = os.fstat(fd)
                    if (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev):
                        os.close(fd)
                        continue
                    stale = _read(fd)
                    if stale:
                        warnings.warn(
                            f"fastgrad: taking over the stale lock {self.path!r} on {self.what}: it was left by "
                            f"{_describe(stale)}, which no longer holds it (the process ended without "
                            "closing its GradMonitor)", RuntimeWarning, stacklevel=5)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps(_owner_record()).encode("utf-8"))
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise RuntimeError(f"could not lock {self.path!r}: it keeps being replaced")  # pragma: no cover

    def release(self) -> None:
        """Give the lock up (idempotent). Removes the lock file, then unlocks."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _HELD_MUTEX:
            key = os.path.realpath(self.path)
            if _HELD.get(key) is self:
                del _HELD[key]
        try:
            # A forked child shares the parent's lock: it must not remove the parent's file.
            if self._pid == os.getpid():
                # Unlink before unlocking: a waiter then finds no file or a new one, never ours unlocked.
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)

    def __getstate__(self):
        raise TypeError(f"a FileLock ({self.path!r}) cannot be copied or pickled: it is an open, locked file")


def _forget_in_child() -> None:
    # After fork the child holds copies of the parent's lock fds; closing them does not
    # release the parent's flock, and the child must not unlink the parent's lock files.
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def close_and_release(files: list, lock: FileLock | None) -> None:
    """Close ``files`` (flushing them), then release ``lock`` — in that order, even if a close fails."""
    try:
        err = None
        for fh in files:
            if fh is not None:
                try:
                    fh.close()
                except OSError as e:
                    err = err or e
        if err is not None:
            raise err
    finally:
        if lock is not None:
            lock.release()


class Claim:
    """A logger's hold on its destination: the lock on ``target`` and the files opened under it.

    ``owner`` is the logger: when it is garbage-collected, or at interpreter exit,
    its files are closed and then the lock released (``weakref.finalize``).
    """

    def __init__(self, owner: object, target: str, what: str):
        self.what = what
        self.lock = FileLock(target, what).acquire()
        self.files: list = []
        self._finalizer = weakref.finalize(owner, close_and_release, self.files, self.lock)

    def open(self, path: str, mode: str, **kw):
        """``open(path, mode, encoding="utf-8", **kw)``, kept for :meth:`close`, with a clear error."""
        try:
            fh = open(path, mode, encoding="utf-8", **kw)  # noqa: SIM115 (kept open until close())
        except OSError as e:
            raise destination_error(e, path, self.what) from e
        self.files.append(fh)
        return fh

    def close(self) -> None:
        """Close the files, then release the lock (idempotent; raises the first OSError a close raised)."""
        self._finalizer.detach()
        files, self.files = list(self.files), []
        close_and_release(files, self.lock)
