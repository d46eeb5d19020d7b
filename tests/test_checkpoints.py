"""Crash-safe checkpoint folders: manifests and verification, `latest` and its fallback to the previous good one,
pruning, crash leftovers, RNG state without pickle, EMA weights, and a checkpoint pruned while it loads."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_ARGS, copy_checkpoint, make_checkpoint, quick_train, train_in_process

from ddpm_hub import checkpoints as ckpt


def test_manifest_verify_and_latest(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    info = ckpt.latest_valid(tmp_path)
    assert info.step == 30 and info.path.name == "checkpoint-30" and info.epoch == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_manifest", "garbage_manifest"])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
    make_checkpoint(tmp_path, 10)
    bad = make_checkpoint(tmp_path, 20)
    target = bad / "unet" / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_file":
        target.unlink()
    elif damage == "delete_manifest":
        (bad / ckpt.MANIFEST).unlink()
    else:
        (bad / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-20"):
        ckpt.verify(bad)
    with caplog.at_level(logging.WARNING):
        info = ckpt.latest_valid(tmp_path)
    assert info.step == 10
    assert "skipping bad checkpoint" in caplog.text


def test_half_written_staging_is_never_latest_and_is_pruned(tmp_path):
    make_checkpoint(tmp_path, 10)
    staging = ckpt.staging_dir(tmp_path, 20)
    staging.mkdir()
    (staging / "optimizer.bin").write_bytes(b"partial")
    assert ckpt.latest_valid(tmp_path).step == 10
    ckpt.prune(tmp_path, total_limit=None)
    assert not staging.exists()


def test_prune_keeps_newest(tmp_path):
    for step in (5, 10, 15, 20):
        make_checkpoint(tmp_path, step)
    ckpt.prune(tmp_path, total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    assert ckpt.latest_valid(tmp_path / "nothing-here") is None


def test_checkpoints_total_limit_prunes(tmp_path):
    out = tmp_path / "run"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
    ]
    train_in_process(args)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-6", "checkpoint-8"]


# -- crash leftovers (kills while pruning and while writing the manifest) ----------------------------------------------


def test_kill_while_pruning_leftover_is_recovered_and_removal_never_renames_onto_it(tmp_path):
    make_checkpoint(tmp_path, 40)
    make_checkpoint(tmp_path, 50)
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
    final = make_checkpoint(tmp_path, 50)
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


# -- the manifest agrees with the folder name and the trainer state ----------------------------------------------------


def test_manifest_step_must_match_folder_name_and_trainer_state(tmp_path, caplog):
    make_checkpoint(tmp_path, 50)
    bad = make_checkpoint(tmp_path, 60)
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
    folder = make_checkpoint(tmp_path, 10)
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"crafted")
    with pytest.raises(ckpt.CheckpointError, match="custom_checkpoint_0.pkl: not in the manifest"):
        ckpt.verify(folder)
    ckpt.write_manifest(folder, 10, 1)  # recomputed, as anyone who can write the folder can
    with pytest.raises(ckpt.CheckpointError, match="custom_checkpoint_0.pkl: pickled state"):
        ckpt.check_no_pickled_state(folder)


def test_latest_with_no_valid_checkpoint_is_an_error_naming_them(tmp_path):
    assert ckpt.resolve_latest(tmp_path) is None  # no checkpoints at all: a fresh run
    for step in (10, 20):
        folder = make_checkpoint(tmp_path, step)
        (folder / "optimizer.bin").write_bytes(b"damaged")
    with pytest.raises(ckpt.CheckpointError, match=r"no valid checkpoint .*rejected: checkpoint-10, checkpoint-20"):
        ckpt.resolve_latest(tmp_path)
    assert ckpt.resolve_latest(tmp_path, allow_new=True) is None  # --resume_from_checkpoint latest_or_new


# -- state without pickle ----------------------------------------------------------------------------------------------


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


CRAFTED = b"cos\nsystem\n(S'touch %s'\ntR."  # pickle protocol 0: os.system("touch ...") when unpickled


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path, short_run, name):
    out = tmp_path / "run"
    folder = copy_checkpoint(short_run, 4, out)
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(CRAFTED.replace(b"%s", str(marker).encode()))
    ckpt.write_manifest(folder, 4, 0)  # recomputed, as anyone who can write the folder can
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(folder / name))) as exc:
        quick_train(out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    assert "\n" not in str(exc.value)
    assert not marker.exists()
    import pickle

    live = tmp_path / "live"
    pickle.loads(CRAFTED.replace(b"%s", str(live).encode()))  # the payload is real: plain unpickling runs it
    assert live.exists()


# -- EMA weights load silently -----------------------------------------------------------------------------------------


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


def test_a_checkpoints_ema_weights_load_silently_as_a_pipeline(short_run, capfd):
    from ddpm_hub import DDPMPipeline

    capfd.readouterr()
    pipeline = DDPMPipeline.from_pretrained(short_run / "checkpoints" / "checkpoint-8")
    out = capfd.readouterr()
    assert "not expected" not in out.err + out.out, out.err
    raw = DDPMPipeline.from_pretrained(short_run / "checkpoints" / "checkpoint-8", weights="raw")
    assert any(not torch.equal(a, b) for a, b in zip(pipeline.unet.parameters(), raw.unet.parameters(), strict=True))


# -- a checkpoint pruned by a running trainer while it loads -----------------------------------------------------------


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

    folder = copy_checkpoint(short_run, 4, tmp_path / "run")
    _prune_during(monkeypatch, folder, *PRUNED_MID_LOAD[where])
    with pytest.raises(ckpt.CheckpointVanishedError) as exc:
        DDPMPipeline.from_pretrained(str(folder), weights=weights)
    message = str(exc.value)
    assert message.startswith(f"{folder} disappeared while loading (removed by a running trainer's pruning"), message
    assert "load a newer checkpoint or the final pipeline" in message and "older version" not in message
    assert "\n" not in message and not folder.exists()


def test_sample_from_a_checkpoint_pruned_mid_load_is_one_line_saying_so(tmp_path, short_run, monkeypatch, capsys):
    from ddpm_hub.cli import main

    folder = copy_checkpoint(short_run, 4, tmp_path / "run")
    _prune_during(monkeypatch, folder, "ddpm_hub.checkpoints", "checkpoint_scheduler_dir")
    assert main(["sample", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {folder} disappeared while loading (removed by a running trainer's pruning of old " \
                  "checkpoints?): load a newer checkpoint or the final pipeline\n", err


def test_a_checkpoint_missing_a_file_from_the_start_keeps_its_own_message(tmp_path, short_run):
    """Not there when the load began (an older version's checkpoint), not "disappeared": the folder is intact."""
    import shutil

    from ddpm_hub import DDPMPipeline

    folder = copy_checkpoint(short_run, 4, tmp_path / "run")
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
    folder = copy_checkpoint(short_run, 4, tmp_path / "other")
    _prune_during(monkeypatch, folder, "ddpm_hub.checkpoints", "load_rng_state")  # said "... an older version?"
    with pytest.raises(ckpt.CheckpointVanishedError) as exc:
        quick_train(tmp_path / "run", "--max_train_steps", "8", "--resume_from_checkpoint", str(folder))
    message = str(exc.value)
    assert message.startswith(f"{folder} disappeared while loading") and "older version" not in message, message
    assert "\n" not in message
