"""Resuming a run: bit-identical losses and weights, a damaged or NaN checkpoint, options changed on resume, and a
new run into another run's checkpoints (`--overwrite_output_dir`, `latest_or_new`)."""

from __future__ import annotations

import json
import logging
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import (
    FAST_ARGS,
    copy_checkpoint,
    main_in_process,
    make_checkpoint,
    quick_train,
    read_metrics,
    run_train,
    unet_weights,
)
from safetensors.torch import load_file, save_file

from ddpm_hub import checkpoints as ckpt


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    common = [
        *FAST_ARGS,
        "--max_train_steps",
        "24",
        "--checkpointing_steps",
        "8",
        "--lr_warmup_steps",
        "5",
        "--checkpoints_total_limit",
        "10",
    ]
    proc = run_train([*common, "--output_dir", str(full)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # resume a second run from the mid-epoch checkpoint at step 16 (1497 // 32 = 46 batches per epoch) and step 8
    for start in (8, 16):
        resumed = tmp_path / f"resumed{start}"
        shutil.copytree(full / "checkpoints" / f"checkpoint-{start}", resumed / "checkpoints" / f"checkpoint-{start}")
        proc = run_train([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        a = [(h["step"], h["loss"]) for h in read_metrics(full)["history"] if "loss" in h]
        b = [(h["step"], h["loss"]) for h in read_metrics(resumed)["history"] if "loss" in h]
        assert len(b) == 24
        assert a == b  # bit-identical loss sequence, and metrics.json keeps the steps before the resume
        wa, wb = unet_weights(full), unet_weights(resumed)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # checkpoints are verified against their manifests and hold diffusers-format unet/ and unet_ema/
    info = ckpt.verify(full / "checkpoints" / "checkpoint-24")
    assert info.step == 24
    assert (info.path / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()


def test_hybrid_loss_learned_variance_and_importance_sampling_resume_exactly(tmp_path):
    """Learned variances with the hybrid loss and importance-sampled timesteps, whose loss history is training
    state: a resume from a checkpoint taken after the sampler warmed up reproduces the losses exactly."""
    common = [*FAST_ARGS, "--variance_type", "learned_range", "--loss_type", "hybrid", "--timestep_sampling",
              "importance", "--num_train_timesteps", "10", "--num_inference_steps", "9", "--max_train_steps", "12",
              "--checkpointing_steps", "6", "--checkpoints_total_limit", "5"]  # fmt: skip
    full = tmp_path / "full"
    proc = run_train([*common, "--output_dir", str(full)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = full / "checkpoints" / "checkpoint-6"
    assert (checkpoint / "timestep_sampler.safetensors").is_file(), "the importance sampler's state is checkpointed"
    assert not list(checkpoint.glob("*.pkl")), "no pickled state of ours"
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-6")
    proc = run_train([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [h["loss"] for h in read_metrics(full)["history"] if h["step"] > 6]
    b = [h["loss"] for h in read_metrics(resumed)["history"] if h["step"] > 6]
    assert a == b and len(b) == 6
    from ddpm_hub import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(full)
    assert pipeline.unet.config.out_channels == 2  # mean and variance channels
    assert pipeline.scheduler.config.variance_type == "learned_range"
    images = pipeline(batch_size=2, num_inference_steps=10, output_type="np").images
    assert np.isfinite(images).all()
    import diffusers

    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):  # these get the mean channels only
        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)
        images = pipeline(batch_size=2, num_inference_steps=5, output_type="np").images
        assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


# -- damaged checkpoints -----------------------------------------------------------------------------------------------


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


def test_latest_with_only_damaged_checkpoints_is_an_error_and_latest_or_new_starts_afresh(tmp_path):
    out = tmp_path / "run"
    for step in (8, 12):
        folder = make_checkpoint(out / "checkpoints", step)
        (folder / "optimizer.bin").write_bytes(b"damaged")
    with pytest.raises(ckpt.CheckpointError, match="rejected: checkpoint-8, checkpoint-12.*latest_or_new"):
        quick_train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert not (out / "model_index.json").exists()
    result = quick_train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest_or_new")
    assert result["steps"] == 4
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]


# -- options changed on resume -----------------------------------------------------------------------------------------


def test_resume_lists_changed_options_and_refuses_the_fixed_ones(caplog):
    from ddpm_hub.resuming import ResumeOptionError, check_resumed_options

    saved = {"learning_rate": 1e-3, "num_train_timesteps": 1000, "seed": 0, "resume_from_checkpoint": None}
    with caplog.at_level(logging.INFO):
        check_resumed_options(saved, {**saved, "learning_rate": 1e-4, "resume_from_checkpoint": "latest"}, "ck")
    assert caplog.text.count("resume: --") == 1 and "--learning_rate was 0.001 in ck, now 0.0001" in caplog.text
    with pytest.raises(ResumeOptionError, match="--num_train_timesteps is 10 here and was"):
        check_resumed_options(saved, {**saved, "num_train_timesteps": 10, "seed": 1}, "ck")
    # another seed or data source: another run's checkpoint (or an inexact resume), refused unless asked
    for changed in ({"seed": 1}, {"train_data_dir": "other/"}, {"dataset_name": "cifar10"}):
        with pytest.raises(ResumeOptionError, match="ck belongs to a run with --.* pass --resume_changed_run"):
            check_resumed_options(saved, {**saved, **changed}, "ck")
        check_resumed_options(saved, {**saved, **changed, "resume_changed_run": True}, "ck")


def test_naming_the_preset_a_run_chose_for_its_resolution_is_no_change_on_resume():
    """A run that named no UNet used the preset chosen for its resolution (`small` at 32, `digits` at 8): naming
    that preset on resume, or leaving out the one it named, is the same run; another preset is refused with advice
    that can be followed (`resume without --unet_preset` where the run named none)."""
    from ddpm_hub.resuming import ResumeOptionError, check_resumed_options

    for resolution, chosen in ((32, "small"), (8, "digits")):
        unnamed = {"resolution": resolution, "unet_preset": None}
        check_resumed_options(unnamed, {**unnamed, "unet_preset": chosen}, "ck")
        check_resumed_options({**unnamed, "unet_preset": chosen}, unnamed, "ck")
    with pytest.raises(ResumeOptionError, match="--unet_preset is tiny here and was small.*resume with the run's "
                       "value \\(--unet_preset small\\)"):  # fmt: skip
        check_resumed_options({"resolution": 32, "unet_preset": None}, {"resolution": 32, "unet_preset": "tiny"}, "ck")
    with pytest.raises(ResumeOptionError, match="resume without --model_config_name_or_path"):
        check_resumed_options({"model_config_name_or_path": None}, {"model_config_name_or_path": "u.json"}, "ck")


def test_a_new_learning_rate_replaces_the_restored_schedules_base_rate():
    from types import SimpleNamespace

    from diffusers.optimization import get_scheduler

    from ddpm_hub.resuming import apply_optimizer_options

    def make(lr):
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        return opt, get_scheduler("cosine", optimizer=opt, num_warmup_steps=4, num_training_steps=20)

    opt, sched = make(1e-3)
    for _ in range(6):
        opt.step()
        sched.step()
    restored_opt, restored_sched = make(1e-3)
    restored_opt.load_state_dict(opt.state_dict())
    restored_sched.load_state_dict(sched.state_dict())
    cfg = SimpleNamespace(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.99, adam_weight_decay=0.5, adam_epsilon=1e-6)
    apply_optimizer_options(restored_opt, restored_sched, cfg)
    new_opt, new_sched = make(1e-4)  # the oracle: the same schedule built with the new rate
    for _ in range(6):
        new_opt.step()
        new_sched.step()
    assert restored_opt.param_groups[0]["lr"] == pytest.approx(new_opt.param_groups[0]["lr"], rel=1e-12)
    restored_sched.step(), new_sched.step()
    assert restored_sched.get_last_lr()[0] == pytest.approx(new_sched.get_last_lr()[0], rel=1e-12)
    group = restored_opt.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.9, 0.99), 0.5, 1e-6)


def test_options_changed_on_resume_are_listed_and_a_new_learning_rate_takes_effect(tmp_path, short_run, caplog):
    """The NaN error's advice ("Lower --learning_rate") works when followed: on resume the new rate replaces the
    restored schedule's, so the losses change; an option that cannot change is refused before any work."""
    from conftest import read_metrics

    from ddpm_hub.config import ConfigError

    out = tmp_path / "run"
    copy_checkpoint(short_run, 4, out)
    with pytest.raises(ConfigError, match="--num_train_timesteps is 10 here and was"):
        quick_train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest", "--num_train_timesteps", "10")
    before = {h["step"]: h for h in read_metrics(short_run)["history"] if "loss" in h}
    saved = json.loads((short_run / "checkpoints" / "checkpoint-4" / ckpt.TRAINER_STATE).read_text())
    base = saved["config"]["learning_rate"]
    lr = base / 10
    with caplog.at_level(logging.INFO):
        quick_train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest", "--learning_rate", str(lr))
    assert "resume: --learning_rate was" in caplog.text and "the new value is used from here on" in caplog.text
    after = {h["step"]: h for h in read_metrics(out)["history"] if "loss" in h}
    assert sorted(after) == [1, 2, 3, 4, 5, 6, 7, 8]  # the run's history before the resume is kept
    after = {step: h for step, h in after.items() if step > 4}
    for step in after:  # the same schedule shape, scaled to the new base rate
        assert after[step]["lr"] / lr == pytest.approx(before[step]["lr"] / base, rel=1e-9)
    assert after[5]["loss"] == before[5]["loss"]  # computed with the step-4 weights
    assert all(after[s]["loss"] != before[s]["loss"] for s in (6, 7, 8))


# -- a new run into another run's checkpoints --------------------------------------------------------------------------


def test_a_new_run_into_another_runs_checkpoints_is_refused_and_overwrite_clears_them(tmp_path):
    from ddpm_hub.config import ConfigError

    out = tmp_path / "run"
    make_checkpoint(out / "checkpoints", 40)  # an older run's
    with pytest.raises(ConfigError, match=r"holds another run's checkpoints \(checkpoint-40\).*--overwrite_output_dir"):
        quick_train(out, "--max_train_steps", "4")
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(Exception, match="no-images"):  # refused by its data: the old run's checkpoints stay
        quick_train(out, "--max_train_steps", "4", "--overwrite_output_dir", "--train_data_dir", str(empty))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-40"]
    quick_train(out, "--max_train_steps", "4", "--overwrite_output_dir")
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]
    assert ckpt.resolve_latest(out / "checkpoints").step == 4  # a later `latest` resumes this run


def test_a_kill_during_an_overwriting_start_never_lets_latest_resume_the_replaced_run(tmp_path, capsys):
    """--overwrite_output_dir marks the earlier run's checkpoints before it checks anything (and deletes them once
    every check passed): killed in between, `latest` refuses them, `latest_or_new` starts afresh; a refused start
    leaves them as they were. A changed seed on resume is refused unless asked (--resume_changed_run)."""
    out = tmp_path / "run"
    base = [*FAST_ARGS, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(out)]
    assert run_train(base, tmp_path).returncode == 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]

    refused = main_in_process([*base, "--overwrite_output_dir", "--seed", "1", "--class_conditional",
                               "--class_column", "image"])  # fmt: skip
    assert refused == 2 and not ckpt.replaced(out / "checkpoints")  # a refused start changes nothing

    new = [*base, "--overwrite_output_dir", "--seed", "1"]
    proc = run_train(new, tmp_path, DDPM_HUB_FAULT="overwrite.marked:kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ckpt.replaced(out / "checkpoints") and (out / "checkpoints" / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert main_in_process([*base, "--seed", "1", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "belong to an earlier run that an --overwrite_output_dir run was replacing when it was interrupted" in err

    # the earlier run's own command, seed changed: refused unless asked
    (out / "checkpoints" / ckpt.REPLACED_MARKER).unlink()
    assert main_in_process([*base, "--max_train_steps", "3", "--seed", "1", "--resume_from_checkpoint", "latest"]) == 2
    assert "belongs to a run with --seed 0 (now 1)" in capsys.readouterr().err
    ckpt.mark_replaced(out / "checkpoints", 1)
    assert main_in_process([*base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest_or_new"]) == 0
    assert not ckpt.replaced(out / "checkpoints")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_a_run_resumes_with_the_unet_it_trained_when_its_preset_builds_another_now(tmp_path, monkeypatch, caplog):
    """A newer ddpm-hub may change what a preset builds (the `small` default did): resuming a run started before
    then uses the UNet config saved in its checkpoint, not the preset's new one (its weights would not load), and
    says so; the finished pipeline has the run's UNet."""
    from ddpm_hub.config import ConfigError
    from ddpm_hub.models import UNET_PRESETS

    out = tmp_path / "run"
    quick_train(out, "--max_train_steps", "4")
    monkeypatch.setitem(UNET_PRESETS, "tiny", {**UNET_PRESETS["tiny"], "block_out_channels": (16, 32)})
    with caplog.at_level(logging.INFO, logger="ddpm_hub.train"):
        quick_train(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert [h["step"] for h in read_metrics(out)["history"] if "loss" in h][-2:] == [5, 6]
    saved = json.loads((out / "unet" / "config.json").read_text())
    assert saved["block_out_channels"] == [8, 16]
    assert any("the run being resumed" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records)
    # the data's channels changed on resume: said as that, not as a model that changed
    with pytest.raises(ConfigError, match="trained on 1-channel images, the data now gives 3 with --channels 3"):
        quick_train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest", "--channels", "3")


def test_a_link_to_an_endless_file_planted_as_a_checkpoints_unet_config_is_refused_not_read(tmp_path):
    """The UNet config a resume reads before verifying the checkpoint is opened as a regular file inside it, at most
    1 MB: a link to /dev/zero planted there is not followed (no endless read), and the resume says the checkpoint is
    bad in one line."""
    out = tmp_path / "run"
    quick_train(out, "--max_train_steps", "4")
    config = out / "checkpoints" / "checkpoint-4" / "unet" / "config.json"
    config.unlink()
    config.symlink_to("/dev/zero")
    proc = run_train([*FAST_ARGS, "--output_dir", str(out), "--checkpointing_steps", "4", "--max_train_steps", "8",
                      "--resume_from_checkpoint", "latest"], tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # a bad checkpoint: 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume_from_checkpoint latest: no valid checkpoint"), last
