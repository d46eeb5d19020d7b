"""Fault injection: SIGKILL during training and checkpointing, damaged checkpoints, full disks, NaN weights,
bad weights folders, and a Hub that fails. Nothing is lost and every failure is reported clearly."""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_ARGS, TRAIN, run_train, subprocess_env
from hub_server import Fault
from safetensors.torch import load_file, save_file

from ddpm_hub import DDPMPipeline
from ddpm_hub import checkpoints as ckpt
from ddpm_hub.hub_push import HubError, push_pipeline_folder

KILL_ARGS = [
    *FAST_ARGS,
    "--max_train_steps",
    "40",
    "--checkpointing_steps",
    "4",
    "--checkpoints_total_limit",
    "3",
    "--lr_warmup_steps",
    "3",
]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_checkpoints_sound(root: Path) -> None:
    """Every folder that looks like a finished checkpoint verifies; only staging folders may be partial."""
    if not root.exists():
        return
    for path in root.iterdir():
        if path.name.endswith(".tmp"):
            continue
        ckpt.verify(path)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    reference = tmp_path / "reference"
    proc = run_train([*KILL_ARGS, "--output_dir", str(reference)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(1234)
    command = [sys.executable, str(TRAIN), *KILL_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    env = subprocess_env(tmp_path)
    kills = {"random": 0, "during_save": 0, "after_save": 0}
    modes = ["during_save", "random", "after_save", "random", "during_save", "random", "after_save", "during_save"]
    completed = False
    for mode in modes + ["none"] * 3:
        before = (
            {p.name for p in (out / "checkpoints").glob("checkpoint-*")} if (out / "checkpoints").exists() else set()
        )
        child = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        killed = False
        while child.poll() is None and time.monotonic() < deadline and mode != "none":
            names = (
                {p.name for p in (out / "checkpoints").glob("checkpoint-*")}
                if (out / "checkpoints").exists()
                else set()
            )
            staging = any(n.endswith(".tmp") for n in names)
            new_final = {n for n in names - before if not n.endswith(".tmp")}
            trigger = (
                (mode == "during_save" and staging)
                or (mode == "after_save" and new_final)
                or (mode == "random" and (names - before) and rng.random() < 0.05)
            )
            if trigger:
                child.send_signal(signal.SIGKILL)
                child.wait()
                kills[mode] += 1
                killed = True
                break
            time.sleep(0.002)
        if not killed:
            _, err = child.communicate(timeout=300)
            assert child.returncode == 0, err.decode()[-3000:]
            completed = True
        _assert_checkpoints_sound(out / "checkpoints")
        info = ckpt.latest_valid(out / "checkpoints")
        assert info is None or info.path.name == f"checkpoint-{info.step}"
        if completed:
            break
    assert completed
    assert sum(kills.values()) >= 5, kills
    assert kills["during_save"] >= 1, kills
    reference_weights, resumed_weights = _final_weights(reference), _final_weights(out)
    assert all(torch.equal(reference_weights[k], resumed_weights[k]) for k in reference_weights)
    (tmp_path / "kills.json").write_text(json.dumps(kills))


def test_resume_from_damaged_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*FAST_ARGS, "--max_train_steps", "8", "--checkpointing_steps", "4", "--output_dir", str(out)]
    assert run_train(args, tmp_path).returncode == 0
    last = out / "checkpoints" / "checkpoint-8"
    weights = last / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    # an explicit path fails naming the file
    proc = run_train([*args, "--resume_from_checkpoint", str(last), "--overwrite_output_dir"], tmp_path)
    assert proc.returncode == 1 and "diffusion_pytorch_model.safetensors" in proc.stderr
    assert "truncated" in proc.stderr
    # "latest" falls back to checkpoint-4 with a warning and finishes
    proc = run_train([*args, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping bad checkpoint" in proc.stderr and "resumed from" in proc.stderr and "checkpoint-4" in proc.stderr


def test_disk_full_during_checkpoint_keeps_previous(tmp_path):
    out = tmp_path / "run"
    base = [*FAST_ARGS, "--checkpointing_steps", "4", "--output_dir", str(out)]
    args = [*base, "--max_train_steps", "8"]
    first = run_train([*base, "--max_train_steps", "4"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    size = (out / "checkpoints" / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    limit = size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, str(TRAIN), *args, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"]
    proc = subprocess.run(
        command,
        env=subprocess_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "could not write checkpoint 8" in proc.stderr and "(a file size limit was reached)" in proc.stderr
    assert "is the disk full?" not in proc.stderr  # the suffix is only added when it is true
    assert "checkpoint-4 is intact" in proc.stderr
    assert ckpt.latest_valid(out / "checkpoints").step == 4
    assert not ckpt.staging_dir(out / "checkpoints", 8).exists()  # the failed staging folder is not left behind
    ckpt.verify(out / "checkpoints" / "checkpoint-4")


def test_nan_weights_in_checkpoint_stop_the_run(tmp_path):
    out = tmp_path / "run"
    base = [*FAST_ARGS, "--checkpointing_steps", "4", "--output_dir", str(out)]
    args = [*base, "--max_train_steps", "8"]
    assert run_train([*base, "--max_train_steps", "4"], tmp_path).returncode == 0
    folder = out / "checkpoints" / "checkpoint-4"
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, path, metadata={"format": "pt"})
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    ckpt.write_manifest(folder, manifest["step"], manifest["epoch"])  # the damage is "valid" on disk
    proc = run_train([*args, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"], tmp_path)
    assert proc.returncode == 1
    assert "NaN or inf at step 5" in proc.stderr
    assert not (out / "checkpoints" / "checkpoint-8").exists()


def _saved_pipeline(tmp_path: Path, trained: Path) -> Path:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    return folder


@pytest.mark.parametrize("damage", ["corrupt", "missing_config", "mismatched_config", "missing_index"])
def test_bad_weight_folders_fail_clearly_without_unpickling(tmp_path, trained, monkeypatch, damage):
    folder = _saved_pipeline(tmp_path, trained)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(b"\x00\x01garbage" * 10)
        needle = "diffusion_pytorch_model.safetensors|safetensors"
    elif damage == "missing_config":
        (folder / "unet" / "config.json").unlink()
        needle = "config.json"
    elif damage == "mismatched_config":
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["block_out_channels"] = [16, 32]
        (folder / "unet" / "config.json").write_text(json.dumps(config))
        needle = "size mismatch|shape|Cannot load"
    else:
        (folder / "model_index.json").unlink()
        needle = "model_index.json"
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickling")))
    with pytest.raises((OSError, ValueError, RuntimeError), match=needle):
        DDPMPipeline.from_pretrained(folder)


def test_hub_faults_are_retried_or_reported_and_repush_completes(hub, trained, tmp_path):
    table = []
    # transient: 500s, a dropped connection and a stalled request during the upload are retried
    for fault in (
        Fault("POST", "/commit/", 503, times=2),
        Fault("POST", "/commit/", "drop"),
        Fault("POST", "/preupload/", "timeout"),
    ):
        hub.reset()
        hub.timeout_seconds = 0.5
        hub.state.faults = [fault]
        push_pipeline_folder(trained, "org/flaky", base_delay=0.01)
        assert "unet/diffusion_pytorch_model.safetensors" in hub.state.repos["org/flaky"].head[1]
        table.append((fault.action, "retried, pushed"))
    # permanent: 401/403 are reported at once with what to do; the local output is intact
    for status in (401, 403):
        hub.reset()
        hub.state.faults = [Fault("POST", "/commit/", status, times=10)]
        with pytest.raises(HubError, match="not authorised"):
            push_pipeline_folder(trained, "org/denied", base_delay=0.01)
        table.append((status, "reported"))
    # a failure that outlasts the retries, then a re-push that completes
    hub.reset()
    hub.state.faults = [Fault("POST", "/commit/", 500, times=10_000)]  # the client also retries 5xx itself
    with pytest.raises(HubError, match="failed after 2 attempt"):
        push_pipeline_folder(trained, "org/later", attempts=2, base_delay=0.01)
    assert (trained / "model_index.json").is_file() and (trained / "unet").is_dir()
    hub.state.faults = []
    push_pipeline_folder(trained, "org/later", attempts=3, base_delay=0.01)
    assert "model_index.json" in hub.state.repos["org/later"].head[1]
    # 404 on a repo when loading: a clear error naming the repo
    hub.reset()
    with pytest.raises(Exception, match="org/does-not-exist"):
        DDPMPipeline.from_pretrained("org/does-not-exist", cache_dir=tmp_path / "cache")
    assert len(table) == 5


def test_token_never_in_errors(hub, trained):
    token = "hf_SecretTokenThatMustNeverLeak42"
    hub.state.token = "another"
    with pytest.raises(HubError) as exc:
        push_pipeline_folder(trained, "org/x", token=token, base_delay=0.01)
    assert token not in str(exc.value) and token not in repr(exc.value.__cause__ or "")
    assert np.all([token not in line for line in str(exc.value).splitlines()])


def test_requests_the_client_retries_are_not_retried_again(hub, trained, monkeypatch):
    """One retry layer: a pre-upload that fails through huggingface_hub's own 5 retries is reported, not retried
    by a second layer around it (which would make 5 x 6 = 30 requests)."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # the client's backoff, made instant
    hub.state.faults = [Fault("POST", "/preupload/", 503, times=10_000)]
    with pytest.raises(HubError, match="failed after 1 attempt"):
        push_pipeline_folder(trained, "org/preupload-down", attempts=5, base_delay=0.01)
    preuploads = [r for r in hub.state.requests if "/preupload/" in r[1]]
    assert len(preuploads) == 6  # 1 + the client's 5 retries
