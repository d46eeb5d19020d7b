"""Symbolic links planted in or under the output folder, and the folder moved away mid-run: the trainer and the
checkpoint pruning never write through a link nor remove a file of its target, and never recreate a moved folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import FAST_ARGS, main_in_process, make_checkpoint, train_in_process

from ddpm_hub import checkpoints as ckpt


def _victim(tmp_path: Path) -> Path:
    """A folder outside the checkpoints (other storage, another run) with files that must survive."""
    victim = tmp_path / "elsewhere"
    (victim / "unet").mkdir(parents=True)
    for name in ("keep.txt", "optimizer.bin", "checkpoint.json", "unet/model.safetensors"):
        (victim / name).write_text("precious")
    return victim


def test_pruning_a_symlinked_checkpoint_removes_the_link_and_never_a_file_of_its_target(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    victim = _victim(tmp_path)
    (root / "checkpoint-5").symlink_to(victim, target_is_directory=True)  # checkpoints moved to other storage
    for step in (10, 20):
        make_checkpoint(root, step)
    removed = ckpt.prune(root, total_limit=2)
    assert [p.name for p in removed] == ["checkpoint-5"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-20"]  # no link, no leftover
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == [
        "checkpoint.json", "keep.txt", "optimizer.bin", "unet", "unet/model.safetensors"]
    assert ckpt.resolve_latest(root).step == 20


def test_symlinked_leftovers_are_unlinked_without_touching_their_targets(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    victim = _victim(tmp_path)
    before = sorted(p.read_text() for p in victim.rglob("*") if p.is_file())
    (root / "checkpoint-7.deleting.tmp").symlink_to(victim, target_is_directory=True)
    (root / "checkpoint-8.tmp").symlink_to(victim, target_is_directory=True)
    (root / "checkpoint-9").symlink_to(victim, target_is_directory=True)
    assert {p.name for p in ckpt.recover(root)} == {"checkpoint-7.deleting.tmp", "checkpoint-8.tmp"}
    ckpt.remove_checkpoint(root / "checkpoint-9")
    make_checkpoint(root, 8)  # a staging folder that is a link is replaced by a real one
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-8"]
    assert not (root / "checkpoint-8").is_symlink()
    assert sorted(p.read_text() for p in victim.rglob("*") if p.is_file()) == before


def test_links_planted_in_the_output_folder_are_never_written_through(tmp_path, capsys):
    """A link at a file the trainer writes (the lock, a sample grid) is replaced, never followed; a linked
    subfolder it writes into (checkpoints/, samples/, logs/) is refused before anything is written."""
    from PIL import Image

    from ddpm_hub.output_lock import LOCK_NAME

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "step-0000002.png").symlink_to(victim)
    (out / LOCK_NAME).symlink_to(victim)
    args = [*FAST_ARGS, "--max_train_steps", "2", "--num_eval_images", "1", "--save_images_steps", "2",
            "--num_inference_steps", "2"]  # fmt: skip
    assert main_in_process([*args, "--output_dir", str(out)]) == 0
    assert victim.read_text() == "precious"
    grid = out / "samples" / "step-0000002.png"
    assert not grid.is_symlink() and Image.open(grid).size[0] > 0
    for name in ("checkpoints", "samples", "logs"):
        elsewhere, linked = tmp_path / f"elsewhere-{name}", tmp_path / f"linked-{name}"
        elsewhere.mkdir()
        linked.mkdir()
        (linked / name).symlink_to(elsewhere)
        capsys.readouterr()
        assert main_in_process([*args, "--output_dir", str(linked)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: --output_dir: {linked / name} is a symbolic link; the trainer never writes through "
                       "links: remove it (or make it a real folder), or choose another --output_dir")  # fmt: skip
        assert list(elsewhere.iterdir()) == []


def test_an_output_folder_renamed_mid_run_stops_the_run_instead_of_being_recreated(tmp_path, monkeypatch, capsys):
    from ddpm_hub.training import trainer as train_module

    out, moved = tmp_path / "run", tmp_path / "moved"
    log_metrics = train_module.Trainer.log_metrics

    def rename_at_step_1(self):
        log_metrics(self)
        if self.global_step == 1:
            out.rename(moved)

    monkeypatch.setattr(train_module.Trainer, "log_metrics", rename_at_step_1)
    code = main_in_process([*FAST_ARGS, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir",
                            str(out)])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {out} was renamed or deleted while this process wrote into it"), errors
    assert not out.exists() and moved.is_dir()  # never recreated at the old path


def test_a_link_planted_inside_a_staging_folder_is_never_kept_and_staging_is_private(tmp_path, monkeypatch, capsys):
    """Checkpoint staging folders are mode 700 while written (no other user can plant in them) and get the usual
    mode once complete; a link that appears inside one anyway (the same user racing the run) fails that checkpoint
    in one line and nothing of it is kept."""
    import stat

    from ddpm_hub.training import checkpointing

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    seen_modes = []
    save_own_state = checkpointing.CheckpointingMixin._save_own_state

    def plant_at_step_4(self, staging):
        save_own_state(self, staging)
        seen_modes.append(stat.S_IMODE(staging.stat().st_mode))
        if self.global_step == 4:
            (staging / "planted.json").symlink_to(victim)

    monkeypatch.setattr(checkpointing.CheckpointingMixin, "_save_own_state", plant_at_step_4)
    out = tmp_path / "run"
    args = [*FAST_ARGS, "--max_train_steps", "6", "--checkpointing_steps", "2", "--output_dir", str(out)]
    code = main_in_process(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "a symbolic link appeared in the checkpoint being written" in errors[0]
    assert seen_modes == [0o700, 0o700] and victim.read_text() == "precious"
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["checkpoint-2"] and not list((out / "checkpoints").glob("*.tmp"))
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_subfolder_swapped_for_a_link_mid_run_stops_the_run_before_it_writes_there(tmp_path, monkeypatch, capsys):
    """`checkpoints/` replaced by a link to another run's checkpoints while training: the next checkpoint stops the
    run in one line; nothing is written into, or pruned from, the other folder."""
    from ddpm_hub.training import trainer as train_module

    other = tmp_path / "other_run_checkpoints"
    (other / "checkpoint-1").mkdir(parents=True)
    (other / "checkpoint-1" / "weights").write_text("the other run's")
    out = tmp_path / "run"
    log_metrics = train_module.Trainer.log_metrics

    def swap_at_step_3(self):
        log_metrics(self)
        if self.global_step == 3:
            (out / "checkpoints").rename(out / "checkpoints.moved")
            (out / "checkpoints").symlink_to(other, target_is_directory=True)

    monkeypatch.setattr(train_module.Trainer, "log_metrics", swap_at_step_3)
    code = main_in_process([*FAST_ARGS, "--max_train_steps", "6", "--checkpointing_steps", "2",
                            "--checkpoints_total_limit", "1", "--output_dir", str(out)])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and errors == [f"error: {out / 'checkpoints'} is a symbolic link; the trainer never writes "
                                    "through links: remove it (or make it a real folder), or choose another "
                                    "--output_dir"], errors  # fmt: skip
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint-1"]
    assert (other / "checkpoint-1" / "weights").read_text() == "the other run's"


def test_a_link_planted_in_the_export_staging_exports_nothing(tmp_path, monkeypatch):
    from ddpm_hub import export

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    write_pipeline = export._write_pipeline

    def plant(staging, *args, **kwargs):
        write_pipeline(staging, *args, **kwargs)
        (staging / "metrics.json").unlink()
        (staging / "metrics.json").symlink_to(victim)

    monkeypatch.setattr(export, "_write_pipeline", plant)
    out = tmp_path / "run"
    with pytest.raises(Exception, match="a symbolic link appeared in the pipeline being written"):
        train_in_process([*FAST_ARGS, "--max_train_steps", "2", "--output_dir", str(out)])
    assert victim.read_text() == "precious" and not (out / "model_index.json").exists()

