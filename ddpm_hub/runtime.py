"""The machine a run gets: torch's CPU thread count per process, decided once and logged.

`accelerate launch` exports OMP_NUM_THREADS=1 unless told `--num_cpu_threads_per_process` (it only sizes the
pool itself with `--cpu`), so a script that obeys OMP_NUM_THREADS blindly runs a CPU job on one core. We honour a
thread count that a person chose (our `--num_cpu_threads`, accelerate's flag, or OMP_NUM_THREADS exported before
launching) and otherwise split the physical cores between the local processes, so that ranks never
oversubscribe the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

LAUNCHER_FLAG = "--num_cpu_threads_per_process"


def physical_cores() -> int:
    """Physical cores this process may use (affinity-aware; psutil's physical count where it knows one)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(usable, physical))


def accelerate_launcher() -> tuple[list[str], dict[str, str]] | None:
    """(command line, environment) of the `accelerate launch` process above this one, or None."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # exported by every accelerate launcher
        return None
    try:
        import psutil

        process = psutil.Process().parent()
        while process is not None:
            cmdline = process.cmdline()
            if any("accelerate" in part for part in cmdline) and any("launch" in part for part in cmdline):
                return cmdline, process.environ()
            process = process.parent()
    except Exception:  # no psutil, or no permission to read a parent: treat as unknown
        return None
    return None


def cpu_threads(
    explicit: int | None,
    local_processes: int,
    environ: Mapping[str, str] | None = None,
    launcher: tuple[Sequence[str], Mapping[str, str]] | None = None,
    cores: int | None = None,
) -> tuple[int, str]:
    """(threads per process, why): an explicit choice wins; else physical cores / local processes."""
    environ = os.environ if environ is None else environ
    if explicit:
        return explicit, "--num_cpu_threads"
    omp = environ.get("OMP_NUM_THREADS", "")
    if launcher is not None:
        cmdline, launcher_env = launcher
        chosen = any(part == LAUNCHER_FLAG or part.startswith(LAUNCHER_FLAG + "=") for part in cmdline)
        if (chosen or "OMP_NUM_THREADS" in launcher_env) and omp.isdigit() and int(omp) > 0:
            return int(omp), "accelerate launch --num_cpu_threads_per_process / OMP_NUM_THREADS"
    elif omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores = cores or physical_cores()
    return max(1, cores // max(1, local_processes)), f"{cores} physical cores / {local_processes} local process(es)"


def configure_cpu_threads(explicit: int | None, local_processes: int) -> tuple[int, str]:
    """Set torch's intra-op threads for a CPU run (see `cpu_threads`) and return (threads, why)."""
    import torch

    threads, why = cpu_threads(explicit, local_processes, launcher=accelerate_launcher())
    torch.set_num_threads(threads)
    return threads, why
