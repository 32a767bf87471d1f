"""One run per ``--save_dir``: an exclusive lock held for the run's lifetime.

The lock is ``fcntl.flock`` on an open descriptor of ``save_dir/run.lock``. The kernel
drops it when the process ends, however it ends (SIGKILL included), so a dead run never
leaves the directory locked. The file also records who holds it (pid, host, start
time) so that the refusal message can name the other run; a file whose recorded run is
gone is stale and is taken over with a note. A process that ends on purpose without
unwinding (Ctrl-C's ``os._exit``) calls ``release_all()`` first, so it leaves no file
behind and the next run takes the lock without that note.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import threading
from typing import Callable, Optional

LOCK_NAME = "run.lock"

_HELD: set = set()  # the locks this process holds, for release_all()
_GUARD = threading.RLock()


class RunLocked(RuntimeError):
    """Another live run holds the lock of this ``--save_dir``."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('hostname', '?')}, started "
            f"{info.get('started', '?')}")


class RunLock:
    """``with RunLock(save_dir, log=print): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, save_dir, *, log: Optional[Callable[[str], None]] = None):
        self.dir = pathlib.Path(save_dir)
        self.path = self.dir / LOCK_NAME
        self.log = log or (lambda s: None)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def read(self) -> dict:
        """The holder recorded in the lock file ({} if none or unreadable)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        """Take the lock or raise ``RunLocked`` naming the run that holds it."""
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # another process may unlink the file between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLocked(self._busy_message()) from None
                # No flock on this file system: fall back to the recorded pid.
                return self._acquire_without_flock()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                with _GUARD:
                    self._fd = fd
                    _HELD.add(self)
                self._take_over(self._read_fd(fd))
                return self
            os.close(fd)
        raise RunLocked(f"cannot lock {self.path}: it keeps being replaced; is another run "
                        f"starting in --save_dir {self.dir}?")

    def _busy_message(self) -> str:
        info = self.read()
        who = _describe(info) if info else "another process"
        return (f"--save_dir {self.dir} is in use by a run ({who}); wait for it to finish, "
                f"or choose another --save_dir")

    def _acquire_without_flock(self) -> "RunLock":
        info = self.read()
        if info and info.get("pid") != os.getpid():
            here = info.get("hostname") == socket.gethostname()
            if not here or _pid_alive(int(info.get("pid", -1))):
                raise RunLocked(self._busy_message() + f" (this file system has no flock: "
                                f"delete {self.path} if that run is gone)")
        with _GUARD:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            _HELD.add(self)
        self._take_over(info)
        return self

    @staticmethod
    def _read_fd(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode("utf-8", "replace")
            info = json.loads(text) if text.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _take_over(self, previous: dict) -> None:
        if previous and previous.get("pid") != os.getpid():
            if previous.get("hostname") == socket.gethostname():
                why = "that process is no longer running"
            else:
                why = "its lock is no longer held"
            self.log(f"note: taking over the stale lock {self.path} of an earlier run "
                     f"({_describe(previous)}): {why}")
        info = {"pid": os.getpid(), "hostname": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, (json.dumps(info) + "\n").encode())
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first, so no waiter sees it empty)."""
        with _GUARD:
            if self._fd is None:
                return
            try:
                os.unlink(self.path)
            except OSError:
                pass
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
            _HELD.discard(self)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def release_all() -> None:
    """Release every lock this process holds (before ending it with ``os._exit``)."""
    with _GUARD:
        for lock in list(_HELD):
            lock.release()
