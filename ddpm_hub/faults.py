"""Named fault points at the write boundaries of checkpoints, exports and locks, for fault-injection tests.

`fault_point("checkpoint.manifest.after_tmp")` does nothing unless the environment variable
`DDPM_HUB_FAULT=NAME:ACTION[:N][,NAME:ACTION[:N]...]` names it: then, at its N-th pass (default 1), the process
is killed (`kill`: SIGKILL to itself, no cleanup runs), raises (`raise`: OSError, `enospc`: OSError(ENOSPC), as a
full disk would) or sends itself SIGTERM/SIGINT/SIGHUP (`sigterm`, `sigint`, `sighup`) and goes on. Every point
is declared in `POINTS`, so a test can cover all of them and a new one cannot be forgotten.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "DDPM_HUB_FAULT"

POINTS: dict[str, str] = {
    # checkpoint save (training/train.py save_checkpoint, checkpoints.py)
    "checkpoint.staging.created": "the fresh staging folder exists, nothing written into it",
    "checkpoint.state.saved": "accelerate's files and the unet/, unet_ema/, scheduler/ folders are written",
    "checkpoint.rng.saved": "this rank's RNG state file is written",
    "checkpoint.trainer_state.saved": "the trainer state (step, run config, timestep sampler) is written",
    "checkpoint.manifest.before_tmp": "before the manifest's temporary file is written",
    "checkpoint.manifest.after_tmp": "the manifest's temporary file is written and fsynced, not yet renamed",
    "checkpoint.manifest.after_replace": "the manifest is in place inside the staging folder",
    "checkpoint.finalize.before_rename": "before the staging folder is renamed to checkpoint-N",
    "checkpoint.finalize.after_rename": "checkpoint-N is in place, the parent folder not yet fsynced",
    # pruning old checkpoints
    "checkpoint.prune.before_rename": "before an old checkpoint is renamed to .deleting.tmp",
    "checkpoint.prune.mid_delete": "the old checkpoint is renamed and half deleted",
    "checkpoint.prune.after_delete": "the old checkpoint is gone",
    # the best checkpoint's pointer (--keep_best_checkpoint; checkpoints.py write_best_pointer)
    "checkpoint.best.pointer_tmp": "best.json's temporary file is written and fsynced, not yet renamed",
    "checkpoint.best.pointer_replaced": "best.json names the new best checkpoint; older ones not yet pruned",
    # the final pipeline export (export.py)
    "export.staging.pipeline_saved": "the pipeline (unet/, scheduler/, model_index.json) is in the staging folder",
    "export.staging.card_saved": "samples.png, README.md and metrics.json are in the staging folder",
    "export.commit.index_removed": "the old model_index.json is gone, nothing moved in yet",
    "export.commit.before_index": "every file but model_index.json is in place",
    "export.commit.done": "the new pipeline is complete",
    # the output-folder lock, a new run replacing an earlier one, and clean stops
    "lock.acquired": "the output folder's lock is held",
    "overwrite.marked": "an --overwrite_output_dir run marked the earlier run's checkpoints, not yet deleted",
    "signal.checkpoint_saved": "the stop checkpoint after SIGTERM/SIGINT is written",
}

_counts: dict[str, int] = {}


SIGNAL_ACTIONS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP}
ACTIONS = ("kill", "raise", "enospc", *SIGNAL_ACTIONS)


def _parse(spec: str) -> list[tuple[str, str, int]]:
    parsed = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in POINTS or parts[1] not in ACTIONS:
            raise ValueError(f"{ENV}={spec!r}: expected NAME:{'|'.join(ACTIONS)}[:N] with NAME one of {sorted(POINTS)}")
        parsed.append((parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 1))
    return parsed


def fault_point(name: str) -> None:
    """Mark a write boundary; kills or raises here when `DDPM_HUB_FAULT` names this point (else nothing)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if name not in POINTS:
        raise ValueError(f"undeclared fault point {name!r}")
    actions = [(action, nth) for target, action, nth in _parse(spec) if target == name]
    if not actions:
        return
    _counts[name] = _counts.get(name, 0) + 1
    for action, nth in actions:
        if _counts[name] == nth:
            _act(name, action)


def _act(name: str, action: str) -> None:
    if action in SIGNAL_ACTIONS:
        os.kill(os.getpid(), SIGNAL_ACTIONS[action])
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<fault point {name}>")
    raise OSError(errno.EIO, f"injected fault at {name}")
