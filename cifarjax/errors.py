"""User-facing failures and their wording: one `error: ...` line on stderr naming the fix, no traceback; exit 2
for bad input or a file-system error, 130 for Ctrl-C and 143 for SIGTERM (which ends a command as Ctrl-C does)."""
from __future__ import annotations

import _thread
import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from tqdm import tqdm

EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143
translators: list = []  # functions error -> UserError or None (distributed.initialize adds one for dead peers)
at_command_end: list = []  # functions run when a command ends, however it ends (RunFolder.lock adds its release)
_warned: set = set()
_warn_lock = threading.Lock()
_interrupt_advice, _hard_exit_requested = None, False

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full; free space there or point the run (--out) or the cache (CIFARJAX_CACHE) "
                  "elsewhere",
    errno.EDQUOT: "the disk quota is used up; free space there or choose another folder",
    errno.EROFS: "that file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; make it readable (and writable for outputs) or choose another path",
    errno.EPERM: "operation not permitted; choose another path",
    errno.ELOOP: "a symbolic link loops back on itself; remove or fix that link",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EIO: "the disk reported an input/output error; check the device",
    errno.EISDIR: "a folder stands where a file is to be written; move it away or choose another path",
}


class UserError(Exception):
    """A problem with the user's input (a path, a file, a flag), with a message saying how to fix it."""
    exit_code = EXIT_USER_ERROR


class Interrupted(UserError):
    """Ctrl-C (or SIGTERM: `terminated`): training stopped cleanly; the message says how to resume."""

    def __init__(self, message: str, terminated: bool = False):
        super().__init__(message)
        self.exit_code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


class Terminated(KeyboardInterrupt):
    """SIGTERM: ends the command as Ctrl-C does."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


def non_finite_loss(step: int, loss: float, lr: float, saved: Optional[tuple], first_loss: Optional[float], run,
                    resume_hint: str, restart_hint: Optional[str]) -> NonFiniteLossError:
    """A non-finite `loss` at `step`, with advice that works (`saved`: the newest checkpoint's step and loss)."""
    where = f"the newest checkpoint (step {saved[0]}) is kept in {run}" if saved else "no checkpoint was written yet"
    if step == 1:
        return NonFiniteLossError(
            f"training loss is {loss} at the very first step, before any update: the inputs or the starting "
            "weights hold NaN or infinite values (check the data, --normalize and --weights); the learning "
            "rate is not the cause")
    lower = f"{lr / 10:g}"
    exploded = saved and saved[1] is not None and first_loss is not None and saved[1] > 10 * first_loss
    if saved and not exploded:
        advice = f"resume from it with a lower learning rate: {resume_hint} --lr {lower}"
    elif restart_hint:
        advice = f"start again with a lower learning rate, replacing this run: {restart_hint} --lr {lower}"
    else:
        advice = f"start again with a lower learning rate ({lower}) in a new run folder"
    return NonFiniteLossError(f"training loss became {loss} at step {step}; stopped ({where}); the learning "
                              f"rate {lr:g} is probably too high: {advice}")


def interrupted(step: int, epoch: float, run, resume_hint: str, terminated: bool) -> Interrupted:
    """A first Ctrl-C (or SIGTERM) stopped training after `step`, saved when there is a run folder."""
    saved = f" (epoch {epoch:.2f}); a checkpoint was saved: resume with {resume_hint}" if run is not None else \
        "; nothing was saved (no run folder)"
    return Interrupted(f"{'terminated (SIGTERM)' if terminated else 'interrupted'} at step {step}{saved}", terminated)


def interrupted_at_once(terminated: bool, run, saved: Optional[tuple], steps_per_epoch: int,
                        resume_hint: str) -> Interrupted:
    """A second Ctrl-C (or a signal before the training loop started): what is saved, truthfully."""
    how = "terminated (SIGTERM)" if terminated else "interrupted at once"
    if run is None:
        return Interrupted(f"{how}; nothing was saved (no run folder)", terminated)
    if saved:
        return Interrupted(f"{how}; the newest checkpoint (step {saved[0]}, epoch {saved[0] / steps_per_epoch:g}) "
                           f"is kept in {run}: resume with {resume_hint}", terminated)
    return Interrupted(f"{how} before the first checkpoint, so nothing is saved yet; the run folder {run} is kept: "
                       f"{resume_hint} starts it from the beginning", terminated)


def set_interrupt_advice(advice: Optional[str]) -> None:
    """What a Ctrl-C outside the training loop leaves (None: nothing to resume)."""
    global _interrupt_advice
    _interrupt_advice = advice


@contextlib.contextmanager
def _command_running():
    """While a command runs, SIGTERM ends it as Ctrl-C does (where no one else handles it), and a Ctrl-C or SIGTERM
    that Python would drop (raised in a garbage-collection callback, where JAX frees its buffers, or a finaliser) is
    delivered again a moment later from another thread; when it ends, however it ends, `at_command_end` runs."""
    previous_hook, pending = sys.unraisablehook, []  # pending: the signal to deliver again (at most one)

    def raise_terminated(*_):
        raise Terminated

    def redeliver(unraisable):
        if unraisable.exc_type is None or not issubclass(unraisable.exc_type, KeyboardInterrupt):
            return previous_hook(unraisable)
        if not pending:  # the thread starts unawaited: a signal delivered while this hook ran would be lost
            pending.append(signal.SIGTERM if issubclass(unraisable.exc_type, Terminated) else signal.SIGINT)
            _thread.start_new_thread(interrupt_later, ())

    def interrupt_later():
        time.sleep(0.05)
        with contextlib.suppress(IndexError):  # the command ended meanwhile
            _thread.interrupt_main(pending.pop())

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, raise_terminated)
    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        pending.clear()
        while at_command_end:
            at_command_end.pop()()


def os_error_message(error: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and what to do."""
    paths = " → ".join(str(p) for p in (error.filename, error.filename2) if p is not None) or "a file"
    return f"{error.strerror or error} on {paths}: {_OS_ADVICE.get(error.errno, 'check that path')}"


def user_error_from_os(error: OSError, doing: str) -> UserError:
    return UserError(f"{doing}: {os_error_message(error)}")


def warn(message: str, key=None) -> None:
    """Print `warning: message` on stderr, once per key (default: the message)."""
    key = message if key is None else key
    with _warn_lock:  # one line each, even from several threads, and not run into a progress bar's line
        if key not in _warned:
            _warned.add(key)
            tqdm.write(f"warning: {message}", file=sys.stderr)
            sys.stderr.flush()


def best_effort(action: Callable, what: str, fallback=None):
    """Run a cache operation; where the file system refuses (read-only, full), warn once and return `fallback`."""
    try:
        return action()
    except OSError as error:
        warn(f"{what} skipped ({os_error_message(error)}); continuing without the cache", key=("cache", what))
        return fallback


def exit_on_user_error(main):
    """Decorate a command's `main`: UserError, Ctrl-C and file-system errors end in one `error: ...` line. After
    `request_hard_exit()` it leaves with `os._exit` (a dead distributed peer or a failed save's threads would hang)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        set_interrupt_advice(None)
        try:
            with _command_running():
                return main(*args, **kwargs)
        except KeyboardInterrupt as error:
            how = "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted (Ctrl-C)"
            advice = _interrupt_advice or "no checkpoint was saved, so nothing to resume"
            failure = Interrupted(f"{how}; {advice}", isinstance(error, Terminated))
        except UserError as error:
            failure = error
        except OSError as error:  # one it has no advice for goes on, traceback and all
            if error.errno not in _OS_ADVICE:
                raise
            failure = UserError(os_error_message(error))
        except Exception as error:  # noqa: BLE001 - as do the errors no translator recognises
            failure = next(filter(None, (translate(error) for translate in translators)), None)
            if failure is None:
                raise
        print(f"error: {failure}", file=sys.stderr, flush=True)
        if _hard_exit_requested:
            sys.stdout.flush()
            os._exit(failure.exit_code)
        raise SystemExit(failure.exit_code) from None

    return wrapper


def request_hard_exit() -> None:
    """Make the next handled error leave with os._exit."""
    global _hard_exit_requested
    _hard_exit_requested = True
