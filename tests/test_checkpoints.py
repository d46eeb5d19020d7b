"""Crash-safe checkpoint folders: manifests, verification, fallback to the previous good one, pruning."""

from __future__ import annotations

import logging

import pytest

from ddpm_hub import checkpoints as ckpt


def _make(root, step, payload=b"weights"):
    staging = ckpt.staging_dir(root, step)
    (staging / "unet").mkdir(parents=True)
    (staging / "unet" / "model.safetensors").write_bytes(payload * 100)
    (staging / "optimizer.bin").write_bytes(b"opt" * 10)
    return ckpt.finalize(root, step, epoch=step // 10)


def test_manifest_verify_and_latest(tmp_path):
    for step in (10, 20, 30):
        _make(tmp_path, step)
    info = ckpt.latest_valid(tmp_path)
    assert info.step == 30 and info.path.name == "checkpoint-30" and info.epoch == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_manifest", "garbage_manifest"])
def test_damaged_latest_falls_back_with_warning(tmp_path, caplog, damage):
    _make(tmp_path, 10)
    bad = _make(tmp_path, 20)
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
    _make(tmp_path, 10)
    staging = ckpt.staging_dir(tmp_path, 20)
    staging.mkdir()
    (staging / "optimizer.bin").write_bytes(b"partial")
    assert ckpt.latest_valid(tmp_path).step == 10
    ckpt.prune(tmp_path, total_limit=None)
    assert not staging.exists()


def test_prune_keeps_newest(tmp_path):
    for step in (5, 10, 15, 20):
        _make(tmp_path, step)
    ckpt.prune(tmp_path, total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    assert ckpt.latest_valid(tmp_path / "nothing-here") is None
