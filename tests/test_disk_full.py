"""A full disk (or a file size limit) while writing checkpoints and exports: one line naming what could not be
written and why (the "is the disk full?" hint only where it is true), the previous state intact, nothing
half-written that loads, and a later run completes."""

from __future__ import annotations

import errno
import resource
import subprocess
import sys

import pytest
import torch
from conftest import FAST_ARGS, TRAIN, export_pipeline_to, quick_train, run_train, subprocess_env, tiny_pipeline

from ddpm_hub import checkpoints as ckpt
from ddpm_hub import faults


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


def test_a_write_that_failed_on_a_full_disk_says_so_even_without_an_errno(tmp_path, monkeypatch):
    """torch's writer reports a full disk as `RuntimeError: [enforce fail ...] unexpected pos 64 vs 0` (no errno):
    the free space left where it wrote decides, and only where it is true."""
    import shutil
    from collections import namedtuple

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 4096))
    assert ckpt.storage_hint(torch_error, tmp_path) == " (is the disk full?)"
    assert ckpt.storage_hint(torch_error) == ""  # no folder: nothing to measure
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 1 << 30, 9 << 30))
    assert ckpt.storage_hint(torch_error, tmp_path) == ""
    assert ckpt.storage_hint(ValueError("bad value"), tmp_path) == ""


def test_safetensors_rust_io_errors_get_the_storage_hint():
    """safetensors raises `SafetensorError` whose text carries the OS error number, not an errno attribute."""
    from safetensors import SafetensorError

    assert ckpt.storage_hint(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) == (
        " (a file size limit was reached)")
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert ckpt.storage_hint(full) == " (is the disk full?)"
    denied = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    assert ckpt.storage_hint(denied) == ""


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


@pytest.mark.parametrize("point", ["export.staging.pipeline_saved", "export.staging.card_saved",
                                   "export.commit.index_removed", "export.commit.before_index"])  # fmt: skip
def test_failed_export_never_leaves_a_folder_that_half_loads(tmp_path, monkeypatch, point):
    from ddpm_hub import DDPMPipeline
    from ddpm_hub.export import EXPORT_STAGING, ExportError

    folder = tmp_path / "model"
    old = tiny_pipeline()
    export_pipeline_to(folder, old)
    new = tiny_pipeline()
    with torch.no_grad():
        for p in new.unet.parameters():
            p.add_(1.0)
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv(faults.ENV, f"{point}:enospc")
    with pytest.raises(ExportError) as exc:
        export_pipeline_to(folder, new)
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
    export_pipeline_to(folder, new)  # the next export completes
    loaded = DDPMPipeline.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), new.unet.parameters(), strict=True))
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


def test_a_full_disk_during_the_final_export_is_one_line_and_a_resume_exports_again(tmp_path, monkeypatch):
    from ddpm_hub.training.errors import TrainingError

    from ddpm_hub import DDPMPipeline

    out = tmp_path / "run"
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv(faults.ENV, "export.staging.card_saved:enospc")
    with pytest.raises(TrainingError) as exc:
        quick_train(out, "--max_train_steps", "4")
    message = str(exc.value)
    assert "\n" not in message and f"could not write the pipeline to {out}" in message
    assert "(is the disk full?)" in message and "--resume_from_checkpoint latest" in message
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # no half folder
    monkeypatch.delenv(faults.ENV)
    quick_train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    DDPMPipeline.from_pretrained(out)
