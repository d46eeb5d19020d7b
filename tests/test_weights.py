"""Weights folders that cannot be trusted: a damaged safetensors file (any flipped header byte, truncated, garbage)
is named as damaged in one line, a missing or mismatched config or index names the file, and pickled weights are
refused without ever being unpickled."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import export_pipeline_to, tiny_pipeline

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet


def test_pickled_only_weights_are_refused_without_unpickling(tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    pipeline = DDPMPipeline(create_unet("tiny"), DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(pipeline.unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not be called on untrusted weights")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(OSError, match="safetensors"):
        DDPMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors"):
        DDPMPipeline.from_pretrained(folder, use_safetensors=False)


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
    export_pipeline_to(folder, tiny_pipeline())
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    assert edit[0] in data
    weights.write_bytes(data.replace(edit[0], edit[1], 1))
    with pytest.raises(OSError) as exc:
        DDPMPipeline.from_pretrained(folder)
    assert "damaged safetensors file" in str(exc.value) and "\n" not in str(exc.value)
    assert str(weights) in str(exc.value)
