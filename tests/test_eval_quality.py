"""Sample quality during training: `--eval_fid_steps` logs FID/KID to the trackers at the right steps from seeded
samples, `--keep_best_checkpoint` keeps (and `--final_weights best` exports) exactly the best checkpoint, resumes
keep the best-so-far, and impossible combinations are one-line errors before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.tracking import GeneralTracker
from conftest import FAST_ARGS, run_train, train_in_process
from PIL import Image
from safetensors.torch import load_file

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.config import ConfigError, parse_args

EVAL = ["--eval_fid_steps", "2", "--eval_fid_samples", "20"]
SCRIPTED = {2: 5.0, 4: 3.0, 6: 4.0, 8: 6.0}  # step -> the selection metric the fake evaluation reports


class RecordingTracker(GeneralTracker):
    """A custom accelerate tracker that records the scalars it is given."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.logs: list[tuple[int | None, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logs.append((step, dict(values)))

    def logged(self, key: str) -> dict[int, float]:
        return {step: values[key] for step, values in self.logs if key in values}


@pytest.fixture
def scripted(monkeypatch):
    """Replace the evaluation by SCRIPTED[step] (recording its arguments), so that the best is known in advance."""
    from ddpm_hub.training import evaluating
    from ddpm_hub.training import trainer as train_module

    calls: list[dict] = []
    current = {}
    original = train_module.Trainer.evaluate_quality

    def evaluate_quality(self):
        current["step"] = self.global_step
        return original(self)

    def fake_quality(pipeline, held_out, num_samples, num_inference_steps, seed=0, batch_size=256, *extra):
        calls.append({"step": current["step"], "num_samples": num_samples, "steps": num_inference_steps,
                      "seed": seed, "scheduler": type(pipeline.scheduler).__name__})  # fmt: skip
        value = SCRIPTED[current["step"]]
        return {"digits_conv_fid": value, "digits_mlp_fid": value + 1}

    monkeypatch.setattr(train_module.Trainer, "evaluate_quality", evaluate_quality)
    monkeypatch.setattr(evaluating, "training_quality", fake_quality)
    return calls


def _args(out: Path, *extra: str) -> list[str]:
    return [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "8", "--checkpointing_steps", "4",
            "--checkpoints_total_limit", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", *EVAL,
            *extra]  # fmt: skip


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_keeps_and_exports_exactly_the_best_checkpoint_and_logs_every_evaluation(tmp_path, scripted):
    out = tmp_path / "run"
    tracker = RecordingTracker()
    result = train_in_process(_args(out, "--keep_best_checkpoint", "--final_weights", "best"), trackers=[tracker])
    assert tracker.logged("digits_conv_fid") == SCRIPTED and tracker.logged("digits_mlp_fid")[4] == 4.0
    assert tracker.logged("best_digits_conv_fid") == {2: 5.0, 4: 3.0, 6: 3.0, 8: 3.0}
    # the same seeded evaluation every time: same seed, sample count, sampler and steps (DPM-Solver++ 10)
    assert [c["step"] for c in scripted] == [2, 4, 6, 8]
    assert all(c == {**scripted[0], "step": c["step"]} for c in scripted)
    assert scripted[0] == {"step": 2, "num_samples": 20, "steps": 10, "seed": 0,
                           "scheduler": "DPMSolverMultistepScheduler"}  # fmt: skip
    # the best (step 4) survives pruning beside the newest; step 2 (an old best) and nothing else is gone
    names = sorted(p.name for p in ckpt.list_checkpoints(out / "checkpoints"))
    assert names == ["checkpoint-4", "checkpoint-8"]
    pointer = ckpt.read_best_pointer(out / "checkpoints")
    assert pointer["checkpoint"] == "checkpoint-4" and pointer["value"] == 3.0
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["best_quality"]["step"] == 4 and state["best_quality"]["metric"] == "digits_conv_fid"
    # the exported pipeline holds exactly the best checkpoint's EMA weights, not the last step's
    exported = _unet(out / "unet")
    assert _same(exported, _unet(out / "checkpoints" / "checkpoint-4" / "unet_ema"))
    assert not _same(exported, _unet(out / "checkpoints" / "checkpoint-8" / "unet_ema"))
    assert result["final_weights"]["step"] == 4


def test_resume_keeps_the_best_so_far(tmp_path, scripted):
    reference = tmp_path / "reference"
    train_in_process(_args(reference, "--keep_best_checkpoint"))
    out = tmp_path / "run"
    train_in_process(_args(out, "--keep_best_checkpoint", "--max_train_steps", "6"))  # checkpoints 4 (best) and 6
    tracker = RecordingTracker()
    train_in_process(_args(out, "--keep_best_checkpoint", "--resume_from_checkpoint", "latest"), trackers=[tracker])
    # had the resumed run forgotten the best (3.0 at step 4), step 8's value would have become the best
    assert tracker.logged("best_digits_conv_fid") == {8: 3.0}
    assert tracker.logged("digits_conv_fid")[8] != 3.0
    assert ckpt.read_best_pointer(out / "checkpoints")["step"] == 4
    assert sorted(p.name for p in ckpt.list_checkpoints(out / "checkpoints")) == ["checkpoint-4", "checkpoint-8"]
    assert _same(_unet(out / "unet"), _unet(reference / "unet"))  # the resume is exact
    # other evaluation settings would compare values that are not comparable: refused before training
    with pytest.raises(ConfigError, match="eval_fid_samples"):
        train_in_process(_args(out, "--keep_best_checkpoint", "--resume_from_checkpoint", "latest",
                               "--eval_fid_samples", "30", "--max_train_steps", "9"))  # fmt: skip


def test_real_evaluation_end_to_end_matches_an_independent_recomputation(tmp_path):
    """The real metric: both digits spaces logged at steps 2 and 4 (the last); the best checkpoint's value is what
    `training_quality` gives for its saved EMA weights with the same seed; its weights are exported."""
    from ddpm_hub.pipelines import DDPMPipeline

    from ddpm_hub.data import ImageDataset, load_digits_dataset, validate_images
    from ddpm_hub.evaluation import training_quality
    from ddpm_hub.sampling import with_sampler

    out = tmp_path / "run"
    tracker = RecordingTracker()
    args = [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "3", "--checkpointing_steps", "100",
            *EVAL, "--keep_best_checkpoint", "--final_weights", "best"]  # fmt: skip
    train_in_process(args, trackers=[tracker])
    logged = tracker.logged("digits_conv_fid")
    assert sorted(logged) == [2, 3]
    for key in ("digits_conv_kid", "digits_mlp_fid", "digits_mlp_kid", "digits_conv_precision"):
        assert sorted(tracker.logged(key)) == [2, 3] and all(np.isfinite(v) for v in tracker.logged(key).values())
    best_step = min(logged, key=logged.get)
    pointer = ckpt.read_best_pointer(out / "checkpoints")
    assert pointer["step"] == best_step and pointer["value"] == logged[best_step]
    folder = out / "checkpoints" / f"checkpoint-{best_step}"
    held, _, _ = validate_images(ImageDataset(load_digits_dataset()["test"], "image", 8, 1), progress=False)
    pipeline = with_sampler(ckpt.load_checkpoint_pipeline(DDPMPipeline, folder), "dpm")
    again = training_quality(pipeline, held, 20, 10, seed=0, batch_size=256)
    assert again["digits_conv_fid"] == pytest.approx(logged[best_step], rel=1e-6)
    assert _same(_unet(out / "unet"), _unet(folder / "unet_ema"))


def test_evaluation_is_seeded_the_same_initial_noise_every_time(tmp_path):
    from ddpm_hub.pipelines import DDPMPipeline

    from ddpm_hub.data import ImageDataset, load_digits_dataset, validate_images
    from ddpm_hub.evaluation import training_quality
    from ddpm_hub.models import create_unet
    from ddpm_hub.sampling import with_sampler
    from ddpm_hub.scheduling_ddpm import DDPMScheduler

    torch.manual_seed(0)
    pipeline = with_sampler(DDPMPipeline(unet=create_unet("tiny").eval(), scheduler=DDPMScheduler()), "dpm")
    held, _, _ = validate_images(ImageDataset(load_digits_dataset()["test"], "image", 8, 1), progress=False)
    first = training_quality(pipeline, held, 20, 5, seed=3)
    torch.manual_seed(123)  # the global generator plays no part
    assert training_quality(pipeline, held, 20, 5, seed=3) == first
    assert training_quality(pipeline, held, 20, 5, seed=4)["digits_conv_fid"] != first["digits_conv_fid"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep_best_checkpoint"], "--keep_best_checkpoint needs --eval_fid_steps N"),
        (["--eval_fid_steps", "2", "--final_weights", "best"], "--final_weights best needs --keep_best_checkpoint"),
        (["--eval_fid_steps", "0"], "--eval_fid_steps must be >= 1"),
        (["--eval_fid_steps", "2", "--eval_fid_samples", "1"], "--eval_fid_samples must be >= 2"),
    ],
)
def test_bad_combinations_are_one_line_errors(tmp_path, capsys, extra, message):
    from ddpm_hub.training.train import main

    assert main([*FAST_ARGS, "--output_dir", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def _image_folder(root: Path, splits: dict[str, int], mode: str) -> Path:
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        (root / split).mkdir(parents=True)
        for i in range(n):
            shape = (8, 8, 3) if mode == "RGB" else (8, 8)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / split / f"{i}.png")
    return root


def test_inception_metrics_without_torch_fidelity_are_an_error_before_training(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed: `import` raises ImportError
    def args(data: Path, out: Path) -> list[str]:
        return [*FAST_ARGS, "--train_data_dir", str(data), "--train_batch_size", "4", "--max_train_steps", "2",
                "--output_dir", str(out), *EVAL]  # fmt: skip

    rgb = _image_folder(tmp_path / "rgb", {"train": 8, "test": 4}, "RGB")
    with pytest.raises(ConfigError, match=r"3x8x8 images use Inception features, which need torch-fidelity") as info:
        train_in_process(args(rgb, tmp_path / "o"))
    assert "\n" not in str(info.value) and not (tmp_path / "o" / "checkpoints").exists()
    gray = _image_folder(tmp_path / "gray", {"train": 8}, "L")  # no held-out split at all
    with pytest.raises(ConfigError, match="--eval_fid_steps needs held-out images"):
        train_in_process(args(gray, tmp_path / "g"))


def test_help_states_the_measured_cost(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "benchmarks/bench_eval_fid.py" in text and "DPM-Solver++ 10 steps" in text


@pytest.mark.slow
def test_two_processes_agree_on_the_best_without_deadlock(tmp_path):
    import socket

    with socket.socket() as sock:  # a free port: not the default 29500 that another launch may hold
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--multi_gpu", "--main_process_port", str(port)]  # fmt: skip
    out = tmp_path / "run"
    args = [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "100", *EVAL,
            "--keep_best_checkpoint", "--final_weights", "best"]  # fmt: skip
    proc = run_train(args, tmp_path, launcher=launcher, threads=1, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pointer = ckpt.read_best_pointer(out / "checkpoints")
    folder = out / "checkpoints" / pointer["checkpoint"]
    assert sorted(p.name for p in folder.glob("rng_state_*")) == ["rng_state_0.safetensors", "rng_state_1.safetensors"]
    assert _same(_unet(out / "unet"), _unet(folder / "unet_ema"))
