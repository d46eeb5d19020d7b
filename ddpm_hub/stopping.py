"""Clean stops: SIGTERM, SIGINT or SIGHUP asks the trainer to finish its optimizer step, save a checkpoint and exit
(143 / 130 / 129); a second signal, more than `REPEAT_WINDOW_S` after the first, exits at once without saving.

Launchers forward signals: `accelerate launch` sends SIGTERM to its child on SIGTERM and on Ctrl-C (when the
terminal has already sent the child SIGINT), torchrun sends each worker the signal it received. A repeat that
arrives within `REPEAT_WINDOW_S` of the first is that forwarding, not a second request, and is ignored.

SIGHUP is what a closed terminal or SSH session sends; a run started with `nohup` ignores it, as asked. Under a
launcher, the launcher's death (even `kill -9`) is turned into a SIGHUP for its child by the kernel
(`PR_SET_PDEATHSIG`), so the run saves and stops instead of training on as an orphan with nowhere to report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

REPEAT_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run", "torch/distributed/run.py")
_PR_SET_PDEATHSIG = 1


def _parent_is_launcher(ppid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(name in cmdline for name in LAUNCHERS)


def hang_up_with_launcher() -> bool:
    """Under `accelerate launch` or torchrun (Linux): ask the kernel to send this process SIGHUP when its launcher
    dies. A run started from a shell is left alone (it may be a `nohup` run meant to outlive the shell). Returns
    whether the request was made."""
    if not sys.platform.startswith("linux"):
        return False
    ppid = os.getppid()
    if not _parent_is_launcher(ppid):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != ppid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGHUP)
    return True


class StopInterrupt(BaseException):
    """Raised by the signal handler inside `StopRequest.interrupting()`: the work there is abandoned (a
    BaseException, so that no `except Exception` of the work swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _silence_output() -> None:
    """Point stdout and stderr at /dev/null: a write to a closed terminal or a dead launcher's pipe would raise
    (a progress bar's BrokenPipeError) in the middle of saving the checkpoint."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


class StopRequest:
    """Records the first SIGTERM/SIGINT/SIGHUP; `agreed()` tells every rank, at the same step, that one arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}
        self._interrupt = False

    def install(self) -> None:
        """Handle SIGTERM, SIGINT and SIGHUP from now on (main thread only, as Python requires), SIGHUP unless it is
        ignored (`nohup`); under a launcher, its death becomes a SIGHUP. Idempotent."""
        if self._previous:
            return
        for sig in SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        if signal.SIGHUP in self._previous:
            hang_up_with_launcher()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            message = (f"received {signal.Signals(signum).name}: finishing the current step, then saving a "
                       f"checkpoint (a second signal, {REPEAT_WINDOW_S:g} s or more after this one, exits at once "
                       "without saving)\n")  # fmt: skip
            try:
                os.write(2, message.encode())
            except OSError:  # the terminal or the launcher's pipe is gone: keep every later write from failing
                _silence_output()
            if self._interrupt:
                raise StopInterrupt(signum)
            return
        if time.monotonic() - self._at < REPEAT_WINDOW_S:
            return  # the launcher forwarding the same request
        os.write(2, f"received {signal.Signals(signum).name} again: exiting without a checkpoint\n".encode())
        os._exit(128 + signum)

    @contextmanager
    def interrupting(self) -> Iterator[None]:
        """Inside the block a stop request raises `StopInterrupt` at once (also one that arrived before): for work
        that a resume redoes from a saved checkpoint, such as the final evaluation and export."""
        self._interrupt = True
        try:
            if self.signum is not None:
                raise StopInterrupt(self.signum)
            yield
        finally:
            self._interrupt = False

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def agreed(self, accelerator) -> bool:
        """True on every rank once any rank was signalled (an all-reduce of the flag on multi-process runs)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        import torch

        flag = torch.tensor([0 if self.signum is None else self.signum], device=accelerator.device)
        flag = accelerator.gather(flag).max()
        if int(flag.item()) and self.signum is None:
            self.signum, self._at = int(flag.item()), time.monotonic()
        return self.signum is not None
