"""Clean stops: SIGTERM or SIGINT asks the trainer to finish its optimizer step, save a checkpoint and exit
(143 / 130); a second signal exits at once.

Launchers forward signals: `accelerate launch` sends SIGTERM to its child on SIGTERM and on Ctrl-C (when the
terminal has already sent the child SIGINT), torchrun sends each worker the signal it received. A repeat that
arrives within `REPEAT_WINDOW_S` of the first is that forwarding, not a second request, and is ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

REPEAT_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopInterrupt(BaseException):
    """Raised by the signal handler inside `StopRequest.interrupting()`: the work there is abandoned (a
    BaseException, so that no `except Exception` of the work swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Records the first SIGTERM/SIGINT; `agreed()` tells every rank, at the same step, that one arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}
        self._interrupt = False

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (main thread only, as Python requires); idempotent."""
        if self._previous:
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            logger.warning("received %s: finishing the current step, then saving a checkpoint (a second signal "
                           "exits at once, without saving)", signal.Signals(signum).name)  # fmt: skip
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
