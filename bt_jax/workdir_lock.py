"""One run per workdir: <workdir>/run.lock names the run that writes there.

A pretraining run holds the lock from start-up to exit; a second run on the same workdir
stops at once with a line naming the first (host, pid, start time, command). The lock file
is JSON {host, pid, started, heartbeat, command, token}:

- created atomically: written whole to a private temporary file, then hard-linked to the
  lock's name, which fails if the name exists (atomic on local file systems and on NFS,
  where O_EXCL is not always);
- released at exit: a normal end, an error, SIGTERM (the job returns) or Ctrl-C;
- refreshed by a heartbeat thread every HEARTBEAT_S; a lock is stale when its heartbeat is
  older than STALE_AFTER_S, or when it names this host and a pid that no longer runs (a run
  killed with SIGKILL). A stale lock is taken over and reported, so a requeued job resumes.
- multi-process runs share one lock: process 0 takes it and every process learns the
  outcome (`hold`).

On gs:// (an object store: no hard links, no create-if-absent through tf.io.gfile/epath) the
lock is written only when absent and read back after GCS_SETTLE_S: of two runs racing for it
the later writer wins and the other stops. Two runs starting within that second can still
both pass; start runs on a bucket one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
GCS_SETTLE_S = 1.0


class WorkdirBusy(ValueError):
    """Another live run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str, *, heartbeat_s=HEARTBEAT_S, stale_after_s=STALE_AFTER_S):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._remote = "://" in workdir
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "heartbeat": time.time(),
            "command": " ".join(sys.argv),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread = None

    def acquire(self, say=print) -> None:
        """Take the lock, or raise WorkdirBusy naming the run that holds it."""
        for _ in range(3):  # a stale lock taken away can be won by a third run
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
            holder = self._read()
            stale = self._why_stale(holder)
            if stale is None:
                raise WorkdirBusy(self._busy_message(holder))
            if self._take_away(holder):
                say(f"took over the stale lock {self.path} of {_describe(holder)}: {stale}")
        raise WorkdirBusy(f"could not take {self.path}: other runs keep taking it; retry")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("token") == self._record["token"]:
            with contextlib.suppress(FileNotFoundError):
                _remove(self.path)

    def _busy_message(self, holder) -> str:
        age = time.time() - float(holder.get("heartbeat", 0)) if holder else float("nan")
        return (
            f"the workdir is in use by another run: {_describe(holder)} holds {self.path} "
            f"(heartbeat {age:.0f} s ago). Use another --workdir, or wait for that run to end; "
            f"if it is dead, its lock goes stale {self.stale_after_s:.0f} s after its last "
            f"heartbeat (or delete {self.path})"
        )

    def _why_stale(self, holder) -> str | None:
        if holder is None:  # unreadable: judge by the file's age
            age = time.time() - _mtime(self.path)
            return f"unreadable and {age:.0f} s old" if age > self.stale_after_s else None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        if holder.get("host") == self._record["host"] and not _pid_alive(holder.get("pid")):
            return f"pid {holder.get('pid')} is no longer running on this host"
        return None

    def _create(self) -> bool:
        text = json.dumps(self._record)
        if self._remote:
            path = epath.Path(self.path)
            if path.exists():
                return False
            path.write_text(text)
            time.sleep(GCS_SETTLE_S)  # the later of two racing writers wins
            holder = self._read()
            return bool(holder) and holder.get("token") == self._record["token"]
        tmp = f"{self.path}.{self._record['token']}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _take_away(self, holder) -> bool:
        """Remove the stale lock `holder`; False if it changed meanwhile (another run's)."""
        if self._remote:
            if self._read() != holder:
                return False
            with contextlib.suppress(FileNotFoundError):
                _remove(self.path)
            return True
        aside = f"{self.path}.{self._record['token']}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another run took it away first: race for the new one
            return False
        if _read_json(aside) != holder:  # it was a fresh lock: put it back
            os.rename(aside, self.path)
            return False
        os.unlink(aside)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if not holder or holder.get("token") != self._record["token"]:
                print(f"warning: lost the workdir lock {self.path}", file=sys.stderr)
                return
            self._record["heartbeat"] = time.time()
            _replace(self.path, json.dumps(self._record))

    def _read(self):
        return _read_json(self.path)


@contextlib.contextmanager
def hold(workdir: str, say=print):
    """The workdir's lock for the duration of a run; process 0 holds it for all processes."""
    from bt_jax import distributed  # jax: only here; the lock itself is plain file work

    lock = WorkdirLock(workdir) if distributed.is_process_0() else None
    error = ""
    if lock is not None:
        try:
            lock.acquire(say)
        except WorkdirBusy as err:
            error = str(err)
    error = distributed.broadcast_text(error)
    if error:
        raise WorkdirBusy(error if lock is not None else f"(from process 0) {error}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _describe(holder) -> str:
    if not holder:
        return "an unknown run (its lock does not read)"
    return (
        f"the run started {holder.get('started')} on host {holder.get('host')}, "
        f"pid {holder.get('pid')} ({holder.get('command')})"
    )


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid to judge by: assume it runs
    return True


def _read_json(path: str):
    try:
        return json.loads(epath.Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _mtime(path: str) -> float:
    try:
        return epath.Path(path).stat().mtime
    except FileNotFoundError:
        return time.time()


def _replace(path: str, text: str) -> None:
    if "://" in path:
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    epath.Path(path).unlink()
