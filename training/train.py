"""Train a DDPM (Ho et al. 2020, Algorithm 1) with Accelerate: `accelerate launch training/train.py [--preset NAME]`.

With no arguments it trains the `digits` preset on the embedded 8x8 UCI digits, offline, in minutes on a CPU.
accelerate owns the machine (device, processes, mixed precision, trackers: `accelerate launch` flags or
`accelerate config`); datasets owns the data; diffusers owns the UNet, EMA and LR schedules. This script parses
the options and runs the trainer: the loop is in trainer.py, checkpoints in checkpointing.py, evaluation during
training in evaluating.py, the final export in finishing.py, the parts in components.py, the data in
training_data.py.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # parse first: --help and bad arguments answer before torch and diffusers load
    from ddpm_hub.config import ConfigError as _ConfigError
    from ddpm_hub.config import parse_args as _parse_args

    try:
        _PARSED = _parse_args(sys.argv[1:], description=__doc__)
    except _ConfigError as _exc:
        print(f"error: {_exc}", file=sys.stderr)
        sys.exit(2)

import os
from pathlib import Path
from typing import Any

from ddpm_hub.training.errors import StoppedBySignal, TrainingError
from ddpm_hub.training.trainer import Trainer

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.config import ConfigError, TrainConfig, parse_args
from ddpm_hub.data import DataError
from ddpm_hub.output_lock import OutputLockedError, release
from ddpm_hub.stopping import StopRequest


def train(cfg: TrainConfig, hub_token: str | None = None, trackers: list | None = None) -> dict[str, Any]:
    """Run one training job in this process (what `accelerate launch training/train.py` does) and return its
    result (`metrics`, `history`, `steps`, ...)."""
    stop = StopRequest()
    stop.install()  # a signal during set-up stops the run after its first step
    try:
        return Trainer(cfg, hub_token=hub_token, trackers=trackers, stop=stop).run()
    finally:
        stop.uninstall()
        # a run refused before it deleted the earlier run's checkpoints leaves them as they were
        ckpt.unmark_replaced(Path(cfg.output_dir) / "checkpoints", by_pid=os.getpid())
        release(cfg.output_dir)


def main(argv: list[str] | None = None, parsed: TrainConfig | None = None) -> int:
    """Entry point; returns a process exit code (2 for bad arguments or data, 1 for a failed run). `parsed`: the
    arguments already parsed (as the script does before importing torch)."""
    try:
        cfg = parsed or parse_args(argv, description=__doc__)
        train(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, ckpt.CheckpointError, OutputLockedError) as exc:  # the last: a folder moved mid-run
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StoppedBySignal as stop:
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(parsed=_PARSED))
