"""Reliability of the output folder, in-process: fault points, crash leftovers, one writer, pickle-free state,
truthful resumes, staged exports, damaged headers and repo ids checked before writing."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from ddpm_hub import checkpoints as ckpt
from ddpm_hub import faults
from ddpm_hub.output_lock import OutputLockedError, acquire, release


def _make(root: Path, step: int, payload: bytes = b"weights") -> Path:
    staging = ckpt.fresh_staging(root, step)
    (staging / "unet").mkdir()
    (staging / "unet" / "model.safetensors").write_bytes(payload * 100)
    (staging / "optimizer.bin").write_bytes(b"opt" * 10)
    return ckpt.finalize(root, step, epoch=step // 10)


# -- fault points -------------------------------------------------------------------------------------------------


def _points_in_source() -> set[str]:
    found = set()
    for path in [*(REPO / "ddpm_hub").rglob("*.py"), *(REPO / "training").rglob("*.py")]:
        found |= set(re.findall(r'fault_point\("([^"]+)"\)', path.read_text()))
    return found


def test_every_fault_point_in_the_code_is_declared_and_every_declared_one_is_used():
    assert _points_in_source() == set(faults.POINTS)


def test_fault_point_does_nothing_unless_named(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("checkpoint.manifest.after_tmp")
    monkeypatch.setenv(faults.ENV, "checkpoint.manifest.after_tmp:raise:2")
    monkeypatch.setattr(faults, "_counts", {})
    faults.fault_point("checkpoint.manifest.before_tmp")  # another point
    faults.fault_point("checkpoint.manifest.after_tmp")  # first pass: not yet
    with pytest.raises(OSError, match="injected fault at checkpoint.manifest.after_tmp"):
        faults.fault_point("checkpoint.manifest.after_tmp")
    monkeypatch.setenv(faults.ENV, "no.such.point:kill")
    with pytest.raises(ValueError, match="DDPM_HUB_FAULT"):
        faults.fault_point("checkpoint.manifest.after_tmp")


# -- crash leftovers (kills while pruning and while writing the manifest) ------------------------------------------


def test_kill_while_pruning_leftover_is_recovered_and_removal_never_renames_onto_it(tmp_path):
    _make(tmp_path, 40)
    _make(tmp_path, 50)
    broken = ckpt.staging_dir(tmp_path, 60)  # the newest save was killed
    broken.mkdir()
    (broken / "optimizer.bin").write_bytes(b"partial")
    trash = tmp_path / "checkpoint-50.deleting.tmp"  # an earlier prune was killed mid-rmtree
    (trash / "unet").mkdir(parents=True)
    (trash / "unet" / "model.safetensors").write_bytes(b"left over")
    ckpt.remove_checkpoint(tmp_path / "checkpoint-50")  # renaming onto the non-empty leftover used to fail
    assert not (tmp_path / "checkpoint-50").exists() and not trash.exists()
    trash.mkdir()
    removed = ckpt.recover(tmp_path)
    assert {p.name for p in removed} == {"checkpoint-60.tmp", "checkpoint-50.deleting.tmp"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-40"]
    assert ckpt.resolve_latest(tmp_path).step == 40


def test_stale_manifest_tmp_is_never_reused(tmp_path):
    stale = ckpt.staging_dir(tmp_path, 50)
    stale.mkdir()
    (stale / (ckpt.MANIFEST + ".tmp")).write_text('{"step": 50}')  # a kill while writing the manifest
    (stale / "optimizer.bin").write_bytes(b"old attempt")
    final = _make(tmp_path, 50)
    manifest = json.loads((final / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"unet/model.safetensors", "optimizer.bin"}
    assert (final / "optimizer.bin").read_bytes() == b"opt" * 10
    assert ckpt.verify(final).step == 50


def test_manifest_tmp_is_not_listed_even_in_a_reused_folder(tmp_path):
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a")
    (folder / (ckpt.MANIFEST + ".tmp")).write_text("{}")
    ckpt.write_manifest(folder, 7, 0)
    assert list(json.loads((folder / ckpt.MANIFEST).read_text())["files"]) == ["a.bin"]


# -- the manifest agrees with the folder name and the trainer state ------------------------------------------------


def test_manifest_step_must_match_folder_name_and_trainer_state(tmp_path, caplog):
    _make(tmp_path, 50)
    bad = _make(tmp_path, 60)
    manifest = json.loads((bad / ckpt.MANIFEST).read_text())
    manifest["step"] = 90  # "resume at step 90" with step-60 state
    (bad / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="says step 90 but the folder is checkpoint-60"):
        ckpt.verify(bad)
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_latest(tmp_path).step == 50
    assert "skipping bad checkpoint" in caplog.text
    # a trainer state of another step, even with a recomputed manifest, is rejected too
    (bad / ckpt.TRAINER_STATE).write_text(json.dumps({"step": 90, "epoch": 9}))
    ckpt.write_manifest(bad, 60, 6)
    with pytest.raises(ckpt.CheckpointError, match="step 90, epoch 9 disagree with the manifest's step 60"):
        ckpt.read_trainer_state(ckpt.verify(bad))


def test_files_added_after_the_manifest_are_rejected(tmp_path):
    folder = _make(tmp_path, 10)
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"crafted")
    with pytest.raises(ckpt.CheckpointError, match="custom_checkpoint_0.pkl: not in the manifest"):
        ckpt.verify(folder)
    ckpt.write_manifest(folder, 10, 1)  # recomputed, as anyone who can write the folder can
    with pytest.raises(ckpt.CheckpointError, match="custom_checkpoint_0.pkl: pickled state"):
        ckpt.check_no_pickled_state(folder)


def test_latest_with_no_valid_checkpoint_is_an_error_naming_them(tmp_path):
    assert ckpt.resolve_latest(tmp_path) is None  # no checkpoints at all: a fresh run
    for step in (10, 20):
        folder = _make(tmp_path, step)
        (folder / "optimizer.bin").write_bytes(b"damaged")
    with pytest.raises(ckpt.CheckpointError, match=r"no valid checkpoint .*rejected: checkpoint-10, checkpoint-20"):
        ckpt.resolve_latest(tmp_path)
    assert ckpt.resolve_latest(tmp_path, allow_new=True) is None  # --resume_from_checkpoint latest_or_new


# -- state without pickle ------------------------------------------------------------------------------------------


def test_rng_state_round_trips_through_safetensors_and_damage_is_an_error(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    path = ckpt.save_rng_state(tmp_path, 0, step=5)
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rng_state(tmp_path, 0, step=5)
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected
    with pytest.raises(ckpt.CheckpointError, match="state of step 5, not 6"):
        ckpt.load_rng_state(tmp_path, 0, step=6)
    with pytest.raises(ckpt.CheckpointError, match="rng_state_1.safetensors: missing"):
        ckpt.load_rng_state(tmp_path, 1, step=5)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ckpt.CheckpointError, match="rng_state_0.safetensors: cannot restore the RNG state"):
        ckpt.load_rng_state(tmp_path, 0, step=5)


@pytest.mark.parametrize(
    ("exc", "hint"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), " (is the disk full?)"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), " (is the disk full?)"),
        (OSError(errno.EFBIG, "File too large"), " (a file size limit was reached)"),
        (OSError(errno.EIO, "Input/output error"), ""),
        (PermissionError(errno.EACCES, "Permission denied"), ""),
        (ValueError("bad"), ""),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
         " (is the disk full?)"),
        (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
         " (a file size limit was reached)"),
        (RuntimeError("Error while serializing: I/O error: Input/output error (os error 5)"), ""),
    ],
)
def test_disk_full_suffix_only_where_true(exc, hint):
    assert ckpt.storage_hint(exc) == hint


# -- one writer ----------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from ddpm_hub.output_lock import acquire
acquire(sys.argv[1], "training")
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_naming_the_pid_and_the_lock_dies_with_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"in use by PID {holder.pid} \(training\)"):
            acquire(tmp_path, "export")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert acquire(tmp_path, "export")  # no stale lock after kill -9
    assert acquire(tmp_path, "push")  # re-entrant within a process
    release(tmp_path)
    release(tmp_path)


# -- EMA weights load silently --------------------------------------------------------------------------------------


def test_checkpoint_ema_weights_load_without_the_unexpected_config_warning(tmp_path, capfd, caplog):
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
    from diffusers.utils import logging as diffusers_logging

    from ddpm_hub.models import unet_config

    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("tiny"))
    ema = EMAModel(unet.parameters(), decay=0.999, model_cls=UNet2DModel, model_config=unet.config)
    for p in unet.parameters():
        p.data.add_(0.5)
    ema.step(unet.parameters())
    ema.save_pretrained(tmp_path / "unet_ema")
    assert "decay" in json.loads((tmp_path / "unet_ema" / "config.json").read_text())
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # other tests may have quietened diffusers: see its warnings here
    diffusers_logging.enable_propagation()  # and through caplog, whatever stream its handler was bound to
    try:
        capfd.readouterr()
        caplog.clear()
        loaded, settings = ckpt.load_ema_unet(tmp_path / "unet_ema")
        out = capfd.readouterr()
        shown = out.err + out.out + caplog.text
        assert "not expected" not in shown and "were passed to" not in shown
        assert settings["decay"] == 0.999 and settings["optimization_step"] == 1
        assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), ema.shadow_params, strict=True))
        # the oracle: diffusers' own loader reads the same weights (and warns about those settings)
        caplog.clear()
        reference = EMAModel.from_pretrained(tmp_path / "unet_ema", model_cls=UNet2DModel)
        out = capfd.readouterr()
        assert "not expected" in out.err + out.out + caplog.text  # the capture sees diffusers' warning
    finally:
        diffusers_logging.disable_propagation()
        diffusers_logging.set_verbosity(verbosity)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), reference.shadow_params, strict=True))
    assert reference.decay == settings["decay"]


# -- resume options -------------------------------------------------------------------------------------------------


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


# -- exports and pushes ---------------------------------------------------------------------------------------------


def _tiny_pipeline():
    from diffusers import UNet2DModel

    from ddpm_hub import DDPMPipeline, DDPMScheduler
    from ddpm_hub.models import unet_config

    torch.manual_seed(0)
    return DDPMPipeline(unet=UNet2DModel(**unet_config("tiny")), scheduler=DDPMScheduler(num_train_timesteps=10))


def _export(folder: Path, pipeline) -> Path:
    from ddpm_hub.export import ModelDescription, export_pipeline

    description = ModelDescription(hparams={}, num_parameters=1, channels=1, dataset_description="test data")
    return export_pipeline(folder, pipeline.unet, pipeline.scheduler, description, {"m": 1.0})


@pytest.mark.parametrize("point", ["export.staging.pipeline_saved", "export.staging.card_saved",
                                   "export.commit.index_removed", "export.commit.before_index"])  # fmt: skip
def test_failed_export_never_leaves_a_folder_that_half_loads(tmp_path, monkeypatch, point):
    from ddpm_hub import DDPMPipeline
    from ddpm_hub.export import EXPORT_STAGING, ExportError

    folder = tmp_path / "model"
    old = _tiny_pipeline()
    _export(folder, old)
    new = _tiny_pipeline()
    with torch.no_grad():
        for p in new.unet.parameters():
            p.add_(1.0)
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv(faults.ENV, f"{point}:enospc")
    with pytest.raises(ExportError) as exc:
        _export(folder, new)
    message = str(exc.value)
    assert message.startswith(f"could not write the pipeline to {folder}") and "\n" not in message
    assert message.endswith("(is the disk full?)")
    assert not (folder / EXPORT_STAGING).exists()
    if (folder / "model_index.json").exists():  # either the old pipeline, whole ...
        loaded = DDPMPipeline.from_pretrained(folder)
        assert all(torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), old.unet.parameters(), strict=True))
    else:  # ... or a folder that does not load as a pipeline at all
        with pytest.raises(OSError):
            DDPMPipeline.from_pretrained(folder)
    monkeypatch.delenv(faults.ENV)
    _export(folder, new)  # the next export completes
    loaded = DDPMPipeline.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), new.unet.parameters(), strict=True))
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.parametrize("repo_id", ["org/..", "bad name", "org/bad name", "org/a--b"])
def test_push_to_hub_validates_the_repo_id_before_writing_anything(tmp_path, monkeypatch, repo_id):
    import tempfile

    from ddpm_hub.hub_push import HubError

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pipeline = _tiny_pipeline()
    with pytest.raises(HubError, match="repo id|ORG/NAME"):
        pipeline.push_to_hub(repo_id)
    with pytest.raises(HubError, match="repo id|ORG/NAME"):
        pipeline.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=repo_id or None)
    assert list(scratch.iterdir()) == [] and not (tmp_path / "out").exists()


def test_every_damaged_byte_of_a_safetensors_header_is_named_as_damaged(tmp_path):
    from safetensors.torch import save_file

    from ddpm_hub.weights import WeightsError, check_safetensors_file

    tensors = {"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.zeros(4), "steps": torch.arange(3)}
    save_file(tensors, tmp_path / "good.safetensors", metadata={"format": "pt"})  # every part of the grammar
    data = (tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "damaged.safetensors"
    for position in range(header_end):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(WeightsError, match="damaged safetensors file"):
            check_safetensors_file(path)


@pytest.mark.parametrize("edit", [(b'"data_offsets"', b'"eata_offsets"'), (b'"F32"', b'"F33"'),
                                  (b'"shape":[', b'"shape":{'), (b'"dtype"', b'"dtypf"')])  # fmt: skip
def test_a_flipped_header_byte_is_a_one_line_damaged_error_when_loading(tmp_path, edit):
    from ddpm_hub import DDPMPipeline

    folder = tmp_path / "model"
    _export(folder, _tiny_pipeline())
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    assert edit[0] in data
    weights.write_bytes(data.replace(edit[0], edit[1], 1))
    with pytest.raises(OSError) as exc:
        DDPMPipeline.from_pretrained(folder)
    assert "damaged safetensors file" in str(exc.value) and "\n" not in str(exc.value)
    assert str(weights) in str(exc.value)


def test_push_cli_refuses_a_folder_another_process_writes(tmp_path, trained):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(trained)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "ddpm_hub", "push", "--folder", str(trained), "--repo_id",
                               "org/x"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0 and f"in use by PID {holder.pid}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- the trainer, in process ------------------------------------------------------------------------------------------


def _train(out: Path, *extra: str) -> dict:
    from conftest import FAST_ARGS, train_in_process

    return train_in_process([*FAST_ARGS, "--output_dir", str(out), "--checkpointing_steps", "4", *extra])


def test_a_new_run_into_another_runs_checkpoints_is_refused_and_overwrite_clears_them(tmp_path):
    from ddpm_hub.config import ConfigError

    out = tmp_path / "run"
    _make(out / "checkpoints", 40)  # an older run's
    with pytest.raises(ConfigError, match=r"holds another run's checkpoints \(checkpoint-40\).*--overwrite_output_dir"):
        _train(out, "--max_train_steps", "4")
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(Exception, match="no-images"):  # refused by its data: the old run's checkpoints stay
        _train(out, "--max_train_steps", "4", "--overwrite_output_dir", "--train_data_dir", str(empty))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-40"]
    _train(out, "--max_train_steps", "4", "--overwrite_output_dir")
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]
    assert ckpt.resolve_latest(out / "checkpoints").step == 4  # a later `latest` resumes this run


def test_latest_with_only_damaged_checkpoints_is_an_error_and_latest_or_new_starts_afresh(tmp_path):
    out = tmp_path / "run"
    for step in (8, 12):
        folder = _make(out / "checkpoints", step)
        (folder / "optimizer.bin").write_bytes(b"damaged")
    with pytest.raises(ckpt.CheckpointError, match="rejected: checkpoint-8, checkpoint-12.*latest_or_new"):
        _train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert not (out / "model_index.json").exists()
    result = _train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest_or_new")
    assert result["steps"] == 4
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]


CRAFTED = b"cos\nsystem\n(S'touch %s'\ntR."  # pickle protocol 0: os.system("touch ...") when unpickled


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """8 steps with checkpoints at 4 and 8, the base of the resume tests."""
    out = tmp_path_factory.mktemp("short") / "run"
    _train(out, "--max_train_steps", "8", "--checkpoints_total_limit", "5")
    return out


def _copy_checkpoint(run: Path, step: int, out: Path) -> Path:
    import shutil

    target = out / "checkpoints" / f"checkpoint-{step}"
    shutil.copytree(run / "checkpoints" / f"checkpoint-{step}", target)
    return target


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path, short_run, name):
    out = tmp_path / "run"
    folder = _copy_checkpoint(short_run, 4, out)
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(CRAFTED.replace(b"%s", str(marker).encode()))
    ckpt.write_manifest(folder, 4, 0)  # recomputed, as anyone who can write the folder can
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(folder / name))) as exc:
        _train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    assert "\n" not in str(exc.value)
    assert not marker.exists()
    import pickle

    live = tmp_path / "live"
    pickle.loads(CRAFTED.replace(b"%s", str(live).encode()))  # the payload is real: plain unpickling runs it
    assert live.exists()


def test_options_changed_on_resume_are_listed_and_a_new_learning_rate_takes_effect(tmp_path, short_run, caplog):
    """The NaN error's advice ("Lower --learning_rate") works when followed: on resume the new rate replaces the
    restored schedule's, so the losses change; an option that cannot change is refused before any work."""
    from conftest import read_metrics

    from ddpm_hub.config import ConfigError

    out = tmp_path / "run"
    _copy_checkpoint(short_run, 4, out)
    with pytest.raises(ConfigError, match="--num_train_timesteps is 10 here and was"):
        _train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest", "--num_train_timesteps", "10")
    before = {h["step"]: h for h in read_metrics(short_run)["history"] if "loss" in h}
    saved = json.loads((short_run / "checkpoints" / "checkpoint-4" / ckpt.TRAINER_STATE).read_text())
    base = saved["config"]["learning_rate"]
    lr = base / 10
    with caplog.at_level(logging.INFO):
        _train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest", "--learning_rate", str(lr))
    assert "resume: --learning_rate was" in caplog.text and "the new value is used from here on" in caplog.text
    after = {h["step"]: h for h in read_metrics(out)["history"] if "loss" in h}
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:  # the same schedule shape, scaled to the new base rate
        assert after[step]["lr"] / lr == pytest.approx(before[step]["lr"] / base, rel=1e-9)
    assert after[5]["loss"] == before[5]["loss"]  # computed with the step-4 weights
    assert all(after[s]["loss"] != before[s]["loss"] for s in (6, 7, 8))


# -- a checkpoint pruned by a running trainer while it loads ----------------------------------------------------------

PRUNED_MID_LOAD = {  # where the load is when the trainer's pruning removes the folder: (module, function)
    "verifying": ("ddpm_hub.checkpoints", "_sha256"),  # between the manifest read and the checksums
    "before the weights": ("ddpm_hub.weights", "diagnose_weights"),
    "before the scheduler": ("ddpm_hub.checkpoints", "checkpoint_scheduler_dir"),  # said "an older version"
    "after the scheduler": ("ddpm_hub.checkpoints", "checkpoint_model_card"),  # loaded silently with a generic card
}


def _prune_during(monkeypatch, folder: Path, module: str, name: str) -> None:
    """The first call of `module.name` first removes `folder` as a running trainer's pruning does."""
    import importlib

    target = importlib.import_module(module)
    original = getattr(target, name)

    def pruned_first(*args, **kwargs):
        if folder.exists():
            ckpt.remove_checkpoint(folder)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, pruned_first)


@pytest.mark.parametrize("weights", ["ema", "raw"])
@pytest.mark.parametrize("where", list(PRUNED_MID_LOAD))
def test_a_checkpoint_pruned_while_it_loads_says_so_not_older_version(tmp_path, short_run, monkeypatch, where,
                                                                         weights):  # fmt: skip
    from ddpm_hub import DDPMPipeline

    folder = _copy_checkpoint(short_run, 4, tmp_path / "run")
    _prune_during(monkeypatch, folder, *PRUNED_MID_LOAD[where])
    with pytest.raises(ckpt.CheckpointVanishedError) as exc:
        DDPMPipeline.from_pretrained(str(folder), weights=weights)
    message = str(exc.value)
    assert message.startswith(f"{folder} disappeared while loading (removed by a running trainer's pruning"), message
    assert "load a newer checkpoint or the final pipeline" in message and "older version" not in message
    assert "\n" not in message and not folder.exists()


def test_sample_from_a_checkpoint_pruned_mid_load_is_one_line_saying_so(tmp_path, short_run, monkeypatch, capsys):
    from ddpm_hub.cli import main

    folder = _copy_checkpoint(short_run, 4, tmp_path / "run")
    _prune_during(monkeypatch, folder, "ddpm_hub.checkpoints", "checkpoint_scheduler_dir")
    assert main(["sample", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {folder} disappeared while loading (removed by a running trainer's pruning of old " \
                  "checkpoints?): load a newer checkpoint or the final pipeline\n", err


def test_a_checkpoint_missing_a_file_from_the_start_keeps_its_own_message(tmp_path, short_run):
    """Not there when the load began (an older version's checkpoint), not "disappeared": the folder is intact."""
    import shutil

    from ddpm_hub import DDPMPipeline

    folder = _copy_checkpoint(short_run, 4, tmp_path / "run")
    shutil.rmtree(folder / "scheduler")  # checkpoints of older versions had none (the run folder's was used)
    (folder / ckpt.TRAINER_STATE).unlink()
    ckpt.write_manifest(folder, 4, 0)
    with pytest.raises(ckpt.CheckpointError, match="written by an older version: copy the run's scheduler") as exc:
        DDPMPipeline.from_pretrained(str(folder))
    assert not isinstance(exc.value, ckpt.CheckpointVanishedError)
    info = ckpt.verify(folder)
    with pytest.raises(ckpt.CheckpointError, match=r"missing \(a checkpoint from an older version\?\)"):
        ckpt.read_trainer_state(info)
    # listed by the manifest (there when it was verified), gone when read: it disappeared
    listed = ckpt.CheckpointInfo(info.path, info.step, info.epoch, files=info.files | {ckpt.TRAINER_STATE})
    with pytest.raises(ckpt.CheckpointVanishedError, match=f"{ckpt.TRAINER_STATE} disappeared while loading"):
        ckpt.read_trainer_state(listed)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint folder"):  # never there: not "disappeared"
        ckpt.load_checkpoint_pipeline(DDPMPipeline, tmp_path / "run" / "checkpoints" / "checkpoint-99")


def test_a_resume_from_a_checkpoint_pruned_mid_load_says_so(tmp_path, short_run, monkeypatch):
    """--resume_from_checkpoint another run's checkpoint-N while that run's trainer prunes it."""
    folder = _copy_checkpoint(short_run, 4, tmp_path / "other")
    _prune_during(monkeypatch, folder, "ddpm_hub.checkpoints", "load_rng_state")  # said "... an older version?"
    with pytest.raises(ckpt.CheckpointVanishedError) as exc:
        _train(tmp_path / "run", "--max_train_steps", "8", "--resume_from_checkpoint", str(folder))
    message = str(exc.value)
    assert message.startswith(f"{folder} disappeared while loading") and "older version" not in message, message
    assert "\n" not in message



def test_every_test_the_fault_table_names_exists():
    page = (REPO / "docs" / "reliability.md").read_text()
    table = page[page.index("| fault | what happens | test |"):].split("\n\n")[0]
    named = set(re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", table))
    defined = {(path.name, name) for path in (REPO / "tests").glob("test_*.py")
               for name in re.findall(r"def (test_\w+)", path.read_text())}  # fmt: skip
    assert len(named) >= 20 and named <= defined, named - defined


def test_stop_request_ignores_the_launchers_forwarded_repeat_and_exits_at_a_real_second_signal(monkeypatch):
    from ddpm_hub import stopping

    exits = []
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    stop = stopping.StopRequest()
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C: no KeyboardInterrupt, a request
        assert stop.signum == signal.SIGINT and stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGTERM)  # accelerate launch forwarding it at once: the same request
        assert exits == [] and stop.exit_code == 130
        monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request: exit at once, without a checkpoint
        assert exits == [128 + signal.SIGTERM]
    finally:
        stop.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous


def test_a_checkpoints_ema_weights_load_silently_as_a_pipeline(short_run, capfd):
    from ddpm_hub import DDPMPipeline

    capfd.readouterr()
    pipeline = DDPMPipeline.from_pretrained(short_run / "checkpoints" / "checkpoint-8")
    out = capfd.readouterr()
    assert "not expected" not in out.err + out.out, out.err
    raw = DDPMPipeline.from_pretrained(short_run / "checkpoints" / "checkpoint-8", weights="raw")
    assert any(not torch.equal(a, b) for a, b in zip(pipeline.unet.parameters(), raw.unet.parameters(), strict=True))


def test_a_full_disk_during_the_final_export_is_one_line_and_a_resume_exports_again(tmp_path, monkeypatch):
    from ddpm_hub.training.errors import TrainingError

    from ddpm_hub import DDPMPipeline

    out = tmp_path / "run"
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv(faults.ENV, "export.staging.card_saved:enospc")
    with pytest.raises(TrainingError) as exc:
        _train(out, "--max_train_steps", "4")
    message = str(exc.value)
    assert "\n" not in message and f"could not write the pipeline to {out}" in message
    assert "(is the disk full?)" in message and "--resume_from_checkpoint latest" in message
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # no half folder
    monkeypatch.delenv(faults.ENV)
    _train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    DDPMPipeline.from_pretrained(out)
