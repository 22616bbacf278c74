"""A run owns its folder while it trains: an OS-level lock on `exp_dir/train.lock`.

`exp_dir_lock(exp_dir)` takes an exclusive `fcntl.flock` on that file for the duration of the block and writes
who holds it (pid, host, start time, command line) into it. The lock belongs to the open file, so it ends with
the process however the process ends (kill -9 included): nothing stale is ever left to clean by hand; the file
itself stays, emptied when the run ends normally. A second training into the same folder fails at once with
`ExpDirInUse`, one line naming the running process. Under torchrun only rank 0 takes it (train.py); other
readers of the folder (test.py, tools) never take it: they read the checkpoints, which are replaced atomically.
`exp_dir_holder(exp_dir)` says whether a training holds a folder (test.py: whether a temporary file in it is
live or was left by a killed save).

flock works on local file systems and on NFSv4 (Linux emulates it with NFS byte-range locks); on a file
system without locks it raises, and the run stops with that error rather than running unprotected.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import shlex
import socket
import sys

LOCK_NAME = "train.lock"


class ExpDirInUse(RuntimeError):
    """Another process holds the run folder's lock."""


def _holder_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return " ".join(text.split()) if text else ("a process that wrote no details: one starting at this moment, or "
                                                "test.py checking the folder for an instant; try again")


def _busy(exc: OSError) -> bool:
    return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@contextlib.contextmanager
def exp_dir_lock(exp_dir: str, enabled: bool = True):
    """Hold `exp_dir`'s lock during the block (creating the folder); ExpDirInUse at once when another process
    holds it. enabled=False (torchrun ranks other than 0) does nothing."""
    if not enabled:
        yield
        return
    os.makedirs(exp_dir, exist_ok=True)
    path = os.path.join(exp_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not _busy(exc):
                raise
            raise ExpDirInUse(f"exp_dir '{exp_dir}' is in use by another training ({_holder_text(fd)}); wait for it "
                              f"to finish or stop it, or choose another exp_dir=...") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}: {command}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # while still held: the next run finds an empty file
    finally:
        os.close(fd)  # releases the lock


def exp_dir_holder(exp_dir: str):
    """What the lock file says about the training that holds `exp_dir` now, or None when none does.
    (Probes with a shared lock for an instant; it never blocks.)"""
    path = os.path.join(exp_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if _busy(exc):
                return _holder_text(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def own_exp_dir(exp_dir: str, dist_info):
    """train.py's use of exp_dir_lock under torchrun: rank 0 takes the lock and every rank learns whether it got
    it (one all-reduce), so no rank trains when the folder is in use and none waits for one that left. Yields
    True while the run owns the folder; on rank 0 a folder in use raises ExpDirInUse, the other ranks get False."""
    from engine.distributed import all_reduce_sum_
    import torch

    with contextlib.ExitStack() as stack:
        refused = None
        try:
            stack.enter_context(exp_dir_lock(exp_dir, enabled=dist_info.is_main))
        except ExpDirInUse as exc:
            refused = exc
        if dist_info.distributed:
            flag = all_reduce_sum_(torch.tensor([float(refused is not None)], device=dist_info.device))
            busy = bool(flag.item() > 0)
        else:
            busy = refused is not None
        if refused is not None:
            raise refused
        yield not busy
