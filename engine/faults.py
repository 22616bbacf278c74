"""Signals at well-defined points: deferred interrupts, and fault injection for the tests.

`interrupts_deferred()`: Ctrl-C / SIGTERM arriving inside the block (a training step, a checkpoint
write) is held and raised as KeyboardInterrupt when the block ends, so the state saved on an
interrupt is always that of a whole step: an interrupted run resumes to the same weights.

`fault_point(where, epoch, iteration)`: the trainer calls it during a step ("step"), before
validation ("validation") and inside each checkpoint write, after the temporary file is written and
before it replaces the target ("last.pth", "best.pth"). When the environment variable
FSS_TEST_FAULT is `WHERE:EPOCH:ITERATION:SIGNAL[:RANK]` (EPOCH counted from 0, ITERATION = steps
done in that epoch; a checkpoint's own epoch/iteration fields), the process sends itself SIGNAL
there (on every rank, or on RANK only): the tests interrupt or kill a run at an exact point instead
of after a guessed delay. SIGNAL may also be an errno name (ENOSPC, EROFS, ...): the point then raises
that OSError, as a failing write would; every write of torch.save inside a checkpoint save is such a point
("last.pth.write", "best.pth.write"), so a full disk is simulated in the middle of a save. Nothing else
sets that variable.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal

FAULT_ENV = "FSS_TEST_FAULT"
_held: list = []
_deferring = [False]


def fault_point(where: str, epoch, iteration) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected WHERE:EPOCH:ITERATION:SIGNAL[:RANK]")
    if len(parts) == 5 and int(parts[4]) != int(os.environ.get("RANK", "0")):
        return
    if (parts[0], parts[1], parts[2]) == (where, str(epoch), str(iteration)):
        if parts[3].startswith("E") and hasattr(errno, parts[3]):
            code = getattr(errno, parts[3])
            raise OSError(code, os.strerror(code))
        os.kill(os.getpid(), getattr(signal, parts[3]))


def raise_or_hold(signum, frame):
    """Signal handler: KeyboardInterrupt now, or at the end of an interrupts_deferred() block."""
    if _deferring[0]:
        _held.append(signum)
        return
    raise KeyboardInterrupt


def hold_interrupts():
    """From now on SIGINT/SIGTERM (handled by raise_or_hold) wait for release_interrupts()."""
    _deferring[0] = True


def release_interrupts():
    """Stop holding; raise KeyboardInterrupt if a signal came while held."""
    _deferring[0] = False
    if _held:
        _held.clear()
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT/SIGTERM (when raise_or_hold handles them) until the block has finished."""
    if _deferring[0]:  # nested: the outer hold raises
        yield
        return
    hold_interrupts()
    try:
        yield
    except BaseException:
        _deferring[0] = False
        raise
    release_interrupts()


def install_interrupt_handlers() -> dict:
    """Handle SIGINT and SIGTERM with raise_or_hold; returns the previous handlers for restore_handlers."""
    return {s: signal.signal(s, raise_or_hold) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_handlers(previous: dict) -> None:
    """Put back the handlers install_interrupt_handlers replaced, and forget any held signal."""
    _held.clear()
    _deferring[0] = False
    for s, handler in previous.items():
        signal.signal(s, handler)
