"""Each benchmark script's --quick smoke version runs once here (so CI covers them) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    ["bench_train", "bench_sample", "bench_bpd", "bench_quality", "bench_make_train", "gpu_check", "bench_samplers",
     "bench_time_to_quality", "bench_guidance"],  # fmt: skip
)
def test_benchmark_quick(script, tmp_path):
    out = tmp_path / f"{script}.json"
    quick = "--dry-run" if script == "gpu_check" else "--quick"  # the GPU check's CPU rehearsal
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), quick, "--out", str(out)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1
    assert "|" in proc.stdout  # the printed table
    rows = result.get("rows") or result.get("per_compute")
    assert rows and all(isinstance(r, dict) for r in rows)
    if script == "bench_make_train":
        assert rows[0]["torch_threads"] >= 1 and rows[0]["busy_cores"] > 0
    if script == "bench_sample":
        assert all(r["max_abs_diff"] < 1e-4 for r in rows)  # speed is never bought with a different result
