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
     "bench_time_to_quality", "bench_guidance", "bench_eval_fid", "bench_small_unet", "bench_editing",
     "bench_sampling_precision"],  # fmt: skip
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
    if script == "bench_editing":  # tiny random models of its own: every part, both models, every mask
        methods = {(r["model"], r["mask"], r["method"]) for r in rows}
        for mask in ("bottom_half", "right_half", "centre_4x4", "random_half"):
            assert {("none", mask, "black fill"), ("unconditional", mask, "replacement"),
                    ("conditional", mask, "replacement")} <= methods  # fmt: skip
        assert rows[0]["method"] == "unmasked originals" and result["inpaint_conditional"]["guidance_scale"] == 2.0
        sdedit = result["sdedit"]["rows"]
        assert {r["corruption"] for r in sdedit} == {"none", "gaussian", "scribble"}
        clean = next(r for r in sdedit if r["corruption"] == "none" and r["strength"] == 0)
        assert clean["digits_conv_accuracy"] == rows[0]["digits_conv_accuracy"]  # strength 0: the input itself
        assert result["interpolation"]["pairs"]


@pytest.mark.slow
def test_bench_recipes_quick_trains_scores_pairs_and_rescores(tmp_path):
    """The recipe study end to end on tiny runs: per-recipe JSONs, the summary with paired differences, then the
    same script scoring an already trained folder without training."""
    script = str(REPO / "benchmarks" / "bench_recipes.py")
    env = subprocess_env(tmp_path, threads=1)
    out = tmp_path / "recipes"
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(out), "--threads", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base, fast = "eps_fixed_b128_3000_lr1e-3", "digits_fast"
    assert f"| {base} |" in proc.stdout and f"minus `{base}`" in proc.stdout
    records = {name: json.loads((out / f"recipe_{name}.json").read_text()) for name in (base, fast)}
    assert records[base]["config"]["prediction_type"] == "epsilon"
    assert records[fast]["config"]["prediction_type"] == "v_prediction"
    for record in records.values():
        assert set(record["scores"]) == {"dpm-10", "dpm-20", "ddpm-20"}
        assert all([row["seed"] for row in rows] == [0, 1] for rows in record["scores"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == base and summary["machine"]["cores"] >= 1
    prev, cur = (records[n]["scores"]["dpm-10"] for n in (base, fast))
    diff = summary["recipes"][fast]["dpm-10"]["minus_baseline"]["digits_conv_fid"]
    expected = sum(c["digits_conv_fid"] - p["digits_conv_fid"] for c, p in zip(cur, prev, strict=True)) / 2
    assert diff["mean"] == pytest.approx(expected) and diff["n"] == 2
    assert (out / "summary.md").read_text().count("## ") == 3

    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, script, "--quick", "--models", str(out / "models" / "digits_fast"), "--out",
                           str(again), "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rescored = json.loads((again / "recipe_digits_fast.json").read_text())
    assert not rescored["trained_here"]

    def without_timing(scores):
        return {k: [{m: v for m, v in r.items() if m != "sample_seconds"} for r in rows] for k, rows in scores.items()}

    # the same model, seeds and samplers give the same scores
    assert without_timing(rescored["scores"]) == without_timing(records[fast]["scores"])
