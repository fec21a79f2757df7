"""One writer per run directory, and places checked for writing before any work starts.

A run directory pairs one plan with what was made from it (checkpoints, adapter, metrics, eval,
report). Two things could break that pairing, and both are refused before anything is written:

- another process writing the same directory (two `tune` commands on one `hydra.run.dir`): every
  command that writes a run directory (train, `tune run`, eval, export, lr-find; a sweep holds its
  sweep directory too) holds an OS file lock on `DIR/.tune.lock` for as long as it works there. The
  kernel releases the lock when the process ends, however it ends, so a lock file left by a process
  that was killed is taken over (with a message), never waited for.
- a different plan written over the one the directory's artifacts were made from: `claim` refuses a
  plan whose hash differs from the plan.json of a directory that already holds results.

`check_writable` finds a place that cannot be written (a file in the way, a read-only mount, no
permission) before the work that would fail there at its end.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from core.errors import PlanError

LOCK_NAME = ".tune.lock"
# What a command leaves in a run directory: a plan.json beside any of these belongs to them.
RESULTS = ("checkpoints", "adapter", "model", "metrics.jsonl", "train_summary.json", "eval.json",
           "lr_find.json", "report.html", "export")


def check_writable(path: str | Path, key: str, *, directory: bool = True) -> Path:
    """`path` (to be created or written) if it can be: its nearest existing ancestor must be a
    directory this process may write into, and `path` itself, where it exists, a directory (or, with
    directory=False, a regular file's place). PlanError naming `key` otherwise."""
    p = Path(path).expanduser().absolute()
    if p.exists() or p.is_symlink():
        if directory and not p.is_dir():
            raise PlanError(key, f"{p} is not a directory (a file is in the way).",
                            hint="choose another path, or move the file away.")
        target = p if p.is_dir() else p.parent
    else:
        target = p.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise PlanError(key, f"cannot create {p}: {target} is a file, not a directory.",
                            hint="choose another path, or move the file away.")
    if not os.access(target, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(target) else "is not writable by this user"
        raise PlanError(key, f"cannot write {p}: {target} {why}.",
                        hint="choose a directory you can write (hydra.run.dir=..., out=...).")
    return p


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class RunDirLock:
    """An exclusive OS lock on `DIR/.tune.lock` (fcntl.flock; a no-op where fcntl is missing), held
    from `acquire()` to `release()`; the file names its holder (pid, host, command, start time)."""

    def __init__(self, run_dir: str | Path, command: str, key: str = "hydra.run.dir"):
        self.dir, self.command, self.key = Path(run_dir), command, key
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        try:
            import fcntl
        except ImportError:             # not a POSIX system: no lock, as before
            return self
        check_writable(self.dir, self.key)
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise PlanError(self.key, f"cannot create the lock file {self.path}: "
                                f"{e.strerror or e}.", hint="choose a directory you can write.") \
                    from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise PlanError(self.key, f"cannot lock {self.path}: {e.strerror or e}.") from None
                raise PlanError(self.key, f"{self.dir} is in use by {_describe(holder)}: one "
                                "command at a time writes a run directory.",
                                hint="wait for it to finish, or use another directory "
                                     "(hydra.run.dir=...).") from None
            # the file we locked may have been removed by its previous holder in the meantime
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise PlanError(self.key, f"could not lock {self.path}: it keeps being replaced.")
        stale = _read_holder(fd)
        if stale and stale.get("pid") and stale.get("pid") != os.getpid():
            print(f"tune: {self.dir} had a lock left by {_describe(stale)}, which is no longer "
                  "running; taking it over.", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": self.command, "started": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)      # while still held: the next holder re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        doc = json.loads(os.read(fd, 4096).decode() or "{}")
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    since = ""
    if isinstance(holder.get("started"), (int, float)):
        since = time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
    return (f"`tune {holder.get('command', '?')}` (process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}{since})")


def holds_results(run_dir: str | Path) -> list[str]:
    """The results a run directory holds (names from RESULTS that exist in it)."""
    d = Path(run_dir)
    return [name for name in RESULTS if (d / name).exists()]


def claim(run_dir: str | Path, plan_hash: str, *, key: str = "hydra.run.dir") -> None:
    """Refuse to write a plan with `plan_hash` into a run directory whose results were made from
    another plan (or from a plan.json that is gone or unreadable); checked before anything is
    written there."""
    d = Path(run_dir)
    results = holds_results(d)
    if not results:
        return
    old = _plan_hash(d / "plan.json")
    if old == plan_hash:
        return
    what = (f"the results of another plan (hash {old[:12]}…; this plan is {plan_hash[:12]}…)"
            if old else "results without a readable plan.json")
    raise PlanError(key, f"{d} holds {what}: {', '.join(results)}. Writing this plan there would "
                    "pair it with results it did not make.",
                    hint="use a fresh directory (hydra.run.dir=...), or remove the old results first; "
                         "`tune eval run=DIR` scores an existing run.")


def _plan_hash(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    h = doc.get("hash") if isinstance(doc, dict) else None
    return h if isinstance(h, str) else None
