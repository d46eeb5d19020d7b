"""The trainer end to end, in subprocesses and in this process: a smoke run through `accelerate launch`, precision
and accumulation, 2 ranks on CPU, learning, CPU threads, trackers, data folders and their checks before training,
fine-tuning, and errors (bad images, NaN losses, bad arguments)."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FAST_ARGS,
    TRAIN,
    RecordingTracker,
    main_in_process,
    read_metrics,
    run_train,
    subprocess_env,
    train_in_process,
    unet_weights,
)
from PIL import Image
from safetensors.torch import load_file

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.config import ConfigError, parse_args
from ddpm_hub.data import DataError
from ddpm_hub.runtime import cpu_threads, physical_cores


def test_two_step_smoke_run_through_accelerate_launch(tmp_path):
    out = tmp_path / "run"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--num_eval_images",
        "4",
        "--num_inference_steps",
        "10",
        "--final_bpd",
        "estimate",
        "--eval_bpd_samples",
        "2",
    ]
    proc = run_train(
        args,
        tmp_path,
        launcher=["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "README.md",
        "samples.png",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("**/*.bin")) or all("checkpoints" in str(p) for p in out.glob("**/*.bin"))
    metrics = read_metrics(out)
    assert metrics["steps"] == 2
    assert "held_out_bits_per_dim_estimate" in metrics["metrics"]
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "unconditional-image-generation" in card
    assert "| learning_rate |" in card and "held_out_bits_per_dim_estimate" in card

    from ddpm_hub import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_bf16_mixed_precision_and_gradient_accumulation(tmp_path):
    out = tmp_path / "bf16"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--mixed_precision",
        "bf16",
        "--gradient_accumulation_steps",
        "2",
    ]
    result = train_in_process(args)
    assert result["mixed_precision"] == "bf16"
    weights = unet_weights(out)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert read_metrics(out)["steps"] == 2


def test_two_rank_cpu_data_parallel_run(tmp_path):
    out = tmp_path / "ddp"
    args = [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "6", "--checkpointing_steps", "3"]
    proc = run_train(
        args,
        tmp_path,
        launcher=[
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        threads=1,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(out)
    assert metrics["num_processes"] == 2
    assert metrics["ranks_identical"] is True
    assert (out / "checkpoints" / "checkpoint-6" / "rng_state_1.safetensors").is_file()  # both ranks' RNG saved


def test_digits_run_learns(tmp_path):
    """Loss falls and the held-out bits/dim estimate (same timesteps and noise each time) improves; with the
    epsilon-prediction, fixed-variance, batch-128 recipe this test was calibrated on (the trainer's learning, not
    a preset, is under test; naming the variance alone also sets the loss to L_simple)."""
    out = tmp_path / "digits"
    args = [
        "--preset",
        "digits",
        "--prediction_type",
        "epsilon",
        "--variance_type",
        "fixed_small",
        "--train_batch_size",
        "128",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(out),
        "--max_train_steps",
        "240",
        "--logger",
        "none",
        "--logging_steps",
        "1",
        "--eval_steps",
        "40",
        "--eval_bpd_samples",
        "8",
        "--num_eval_images",
        "0",
        "--final_bpd",
        "none",
        "--num_quality_samples",
        "0",
        "--checkpointing_steps",
        "1000",
        "--save_images_steps",
        "100000",
        "--lr_warmup_steps",
        "20",
    ]
    history = train_in_process(args)["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    bpd = [h["held_out_bpd_estimate"] for h in history if "held_out_bpd_estimate" in h]
    assert np.mean(losses[-20:]) < 0.6 * losses[0], losses[:3] + losses[-3:]  # from the first step's loss
    assert bpd[-1] < bpd[0] - 0.5, bpd


def test_cpu_thread_policy():
    assert cpu_threads(None, 1, environ={}, cores=8) == (8, "8 physical cores / 1 local process(es)")
    assert cpu_threads(None, 2, environ={}, cores=8)[0] == 4
    assert cpu_threads(3, 2, environ={"OMP_NUM_THREADS": "1"}, cores=8)[0] == 3  # our flag wins
    # accelerate launch's silent default OMP_NUM_THREADS=1 is not a choice: use the cores
    launcher = (["accelerate", "launch", "train.py"], {})
    assert cpu_threads(None, 1, environ={"OMP_NUM_THREADS": "1"}, launcher=launcher, cores=8)[0] == 8
    # ... but an explicit --num_cpu_threads_per_process, or OMP_NUM_THREADS exported before launching, is
    chosen = (["accelerate", "launch", "--num_cpu_threads_per_process", "1", "train.py"], {})
    assert cpu_threads(None, 1, environ={"OMP_NUM_THREADS": "1"}, launcher=chosen, cores=8)[0] == 1
    exported = (["accelerate", "launch", "train.py"], {"OMP_NUM_THREADS": "3"})
    assert cpu_threads(None, 1, environ={"OMP_NUM_THREADS": "3"}, launcher=exported, cores=8)[0] == 3
    assert cpu_threads(None, 1, environ={"OMP_NUM_THREADS": "2"}, cores=8)[0] == 2  # plain python: honoured


def _launch(tmp_path, launcher: list[str], args: list[str], drop_omp: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env(tmp_path)
    if drop_omp:  # as a user's shell: nothing exported
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(TRAIN), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_accelerate_launch_owns_precision_and_the_cpu_uses_every_core(tmp_path):
    """`accelerate launch --mixed_precision bf16` is obeyed (our flag no longer overrides it), and without
    --num_cpu_threads_per_process the run uses all physical cores, not accelerate's OMP_NUM_THREADS=1."""
    out = tmp_path / "a"
    common = [*FAST_ARGS, "--max_train_steps", "2"]
    proc = _launch(tmp_path, ["--num_processes", "1", "--mixed_precision", "bf16"], [*common, "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert metrics["mixed_precision"] == "bf16" and metrics["device"] == "cpu"
    assert metrics["cpu_threads"] == physical_cores()
    out = tmp_path / "b"
    proc = _launch(tmp_path, ["--num_processes", "1", "--num_cpu_threads_per_process", "1"],
                   [*common, "--output_dir", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)["cpu_threads"] == 1 and read_metrics(out)["mixed_precision"] == "no"


def test_any_accelerate_tracker_gets_the_config_scalars_and_images(tmp_path):
    tracker = RecordingTracker()
    args = [*FAST_ARGS, "--output_dir", str(tmp_path / "t"), "--max_train_steps", "4", "--logger", "none",
            "--save_images_steps", "2", "--num_eval_images", "4", "--num_inference_steps", "3", "--eval_steps", "2",
            "--final_bpd", "estimate", "--eval_bpd_samples", "2", "--learning_rate", "3e-4"]  # fmt: skip
    result = train_in_process(args, trackers=[tracker])
    assert tracker.config["learning_rate"] == 3e-4 and tracker.config["unet_preset"] == "tiny"
    steps = [step for step, values in tracker.logs if "loss" in values]
    assert steps == [1, 2, 3, 4]
    assert any("held_out_bpd_estimate" in values for _, values in tracker.logs)
    assert tracker.images == [2, 4]
    assert result["metrics"]["held_out_bits_per_dim_estimate"] > 0


# -- the data ----------------------------------------------------------------------------------------------------------


def _image_folder(root, n, mode="RGB", size=8, seed=0):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / f"img{i}.png")
    return root


def test_image_folder_with_test_split_reports_held_out_bits_per_dim(tmp_path):
    root = tmp_path / "data"
    _image_folder(root / "train", 8, mode="L")
    _image_folder(root / "test", 3, mode="L", seed=1)
    for split, n in (("train", 8), ("test", 3)):  # imagefolder: a metadata.jsonl lists every image of its split
        (root / split / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"img{i}.png", "label": i % 2}) + "\n" for i in range(n))
        )
    args = [*FAST_ARGS, "--train_data_dir", str(root), "--train_batch_size", "4", "--max_train_steps", "2",
            "--final_bpd", "estimate", "--eval_bpd_samples", "2", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    result = train_in_process(args)
    assert result["metrics"]["held_out_bits_per_dim_estimate"] > 0


def _save_images(root: Path, images: dict[str, Image.Image]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(root / name)
    return root


def _gray(i: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8))


def _rgb(i: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8))


class _Ranks:
    """The accelerator attributes `prepare_data` reads, for `num_processes` processes."""

    def __init__(self, num_processes: int = 1):
        self.num_processes = num_processes
        self.is_local_main_process = True

    def main_process_first(self):
        return contextlib.nullcontext()


def _prepare(args: list[str], num_processes: int = 1):
    from ddpm_hub.training.training_data import prepare_data

    cfg = parse_args([*FAST_ARGS, "--resolution", "8", *args])
    return prepare_data(cfg, _Ranks(num_processes))


def test_num_epochs_takes_effect_and_max_train_steps_none_is_accepted(tmp_path):
    assert parse_args(["--num_epochs", "2"]).max_train_steps is None  # replaces the preset's step count
    assert parse_args(["--num_epochs", "2", "--max_train_steps", "5"]).max_train_steps == 5  # same level: steps
    cfg = parse_args(["--max_train_steps", "none", "--num_epochs", "3"])
    assert (cfg.max_train_steps, cfg.num_epochs) == (None, 3)
    config = tmp_path / "c.yaml"
    config.write_text("max_train_steps: 7\n")
    assert parse_args(["--config", str(config), "--num_epochs", "2"]).max_train_steps is None  # CLI > file
    config.write_text("num_epochs: 2\n")
    assert parse_args(["--config", str(config), "--max_train_steps", "4"]).max_train_steps == 4
    with pytest.raises(ConfigError, match="give --max_train_steps or --num_epochs"):
        parse_args(["--max_train_steps", "none"])
    data = _save_images(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(16)})
    result = train_in_process([*FAST_ARGS, "--train_data_dir", str(data), "--train_batch_size", "4", "--num_epochs",
                               "2", "--num_eval_images", "0", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert result["steps"] == 2 * 16 // 4


def test_fewer_images_than_a_batch_per_process_is_an_error_before_training(tmp_path):
    data = _save_images(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(40)})
    args = ["--train_data_dir", str(data), "--train_batch_size", "32"]
    assert _prepare(args).num_train == 40  # one process: one batch of 32 per epoch
    with pytest.raises(ConfigError, match="--train_batch_size 32 x 2 processes needs at least 64 training images, "
                                          "the data has 40"):  # fmt: skip
        _prepare(args, num_processes=2)


@pytest.mark.slow
def test_two_processes_with_fewer_images_than_two_batches_stop_before_training(tmp_path):
    """The real launch: each of 2 processes would get no full batch (a ZeroDivisionError in the loop before)."""
    from conftest import run_train

    data = _save_images(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(40)})
    args = [*FAST_ARGS, "--train_data_dir", str(data), "--train_batch_size", "32", "--channels", "1",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    proc = run_train(args, tmp_path, launcher=launcher, threads=1)
    assert proc.returncode != 0 and "ZeroDivisionError" not in proc.stderr
    assert "error: --train_batch_size 32 x 2 processes needs at least 64 training images, the data has 40" in (
        proc.stderr
    )
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("first,rest,expected", [(_gray, _rgb, 3), (_rgb, _gray, 1)])
def test_channels_come_from_the_majority_of_the_data_with_a_log_line(tmp_path, caplog, first, rest, expected):
    images = {"0.png": first(0), "1.png": rest(1), "2.png": rest(2)}
    data = _save_images(tmp_path / "imgs", images)
    with caplog.at_level(logging.WARNING):
        prepared = _prepare(["--train_data_dir", str(data), "--train_batch_size", "2", "--unet_preset", "tiny"])
    assert prepared.channels == expected and prepared.train[0][0].shape[0] == expected
    kinds = ("1 grayscale and 2 colour", "2 grayscale and 1 colour")[expected == 1]
    assert f"mixes {kinds} images: converting all to {'RGB' if expected == 3 else 'grayscale'}" in caplog.text


def test_bad_held_out_images_are_skipped_only_when_asked(tmp_path, caplog):
    root = tmp_path / "data"
    _save_images(root / "train", {f"{i}.png": _gray(i) for i in range(4)})
    _save_images(root / "test", {f"{i}.png": _gray(i) for i in range(2)})
    (root / "test" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    args = ["--train_data_dir", str(root), "--train_batch_size", "2", "--channels", "1"]
    with pytest.raises(DataError, match=r"broken\.png.*--skip_bad_images"):
        _prepare(args)
    with caplog.at_level(logging.WARNING):
        assert _prepare([*args, "--skip_bad_images"]).held_out.shape[0] == 2
    assert "skipped 1 unreadable held-out images" in caplog.text


def test_no_held_out_split_is_said_before_training(tmp_path, caplog):
    data = _save_images(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(4)})
    with caplog.at_level(logging.WARNING):
        prepared = _prepare(["--train_data_dir", str(data), "--train_batch_size", "2", "--final_bpd", "estimate"])
    assert prepared.held_out is None
    assert "no held-out split: no held-out bits/dim (--final_bpd estimate)" in caplog.text


# -- fine-tuning -------------------------------------------------------------------------------------------------------


def test_model_config_json_and_fine_tuning_from_a_pipeline(tmp_path, trained):
    from ddpm_hub.models import unet_config

    config = dict(unet_config("tiny"), block_out_channels=[8, 8], sample_size=8)
    (tmp_path / "unet.json").write_text(json.dumps(config))
    out = tmp_path / "custom"
    train_in_process([*FAST_ARGS[2:], "--model_config_name_or_path", str(tmp_path / "unet.json"),
                      "--max_train_steps", "1", "--output_dir", str(out)])  # fmt: skip
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [8, 8]
    # fine-tuning: the weights and the scheduler config come from the pipeline (trained with T=1000 linear)
    scheduler = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    tuned = tmp_path / "tuned"
    train_in_process([*FAST_ARGS[2:], "--pretrained_model_name_or_path", str(trained), "--max_train_steps", "1",
                      "--learning_rate", "1e-12", "--use_ema", "false", "--beta_schedule", "sigmoid",
                      "--output_dir", str(tuned)])  # fmt: skip
    before = load_file(trained / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "unet" / "diffusion_pytorch_model.safetensors")
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-6
    saved = json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())
    assert saved["beta_schedule"] == scheduler["beta_schedule"] != "sigmoid"


# -- errors ------------------------------------------------------------------------------------------------------------


def test_bad_cli_arguments_exit_2_with_message(tmp_path):
    proc = run_train(["--max_train_steps", "-1", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2 and "--max_train_steps" in proc.stderr
    proc = run_train(["--preset", "digits", "--resolution", "9", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2 and "--resolution 9 is not divisible" in proc.stderr
    folder = _image_folder(tmp_path / "few", n=3)
    proc = run_train([*FAST_ARGS, "--train_data_dir", str(folder), "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    assert "--train_batch_size 32 needs at least 32 training images, the data has 3" in proc.stderr


def test_corrupt_image_named_or_skipped(tmp_path):
    folder = _image_folder(tmp_path / "imgs", n=6)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    args = [
        *FAST_ARGS,
        "--train_data_dir",
        str(folder),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--unet_preset",
        "tiny",
        "--channels",
        "1",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    proc = run_train(args, tmp_path)
    assert proc.returncode == 2
    assert "broken.png" in proc.stderr and "--skip_bad_images" in proc.stderr
    proc = run_train([*args, "--skip_bad_images"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 unreadable" in proc.stderr


def test_nonfinite_loss_stops_with_step_and_saves_no_nan(tmp_path):
    out = tmp_path / "nan"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "50",
        "--checkpointing_steps",
        "1",
        "--learning_rate",
        "1e30",
        "--lr_warmup_steps",
        "0",
        "--max_grad_norm",
        "1e30",
        "--checkpoints_total_limit",
        "100",
    ]
    proc = run_train(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "NaN or inf at step" in proc.stderr or "non-finite weights at step" in proc.stderr
    assert not (out / "model_index.json").exists()
    for folder in ckpt.list_checkpoints(out / "checkpoints"):
        for name in ("unet", "unet_ema"):
            weights = load_file(folder / name / "diffusion_pytorch_model.safetensors")
            assert all(torch.isfinite(w).all() for w in weights.values()), folder


def test_a_sampler_that_cannot_sample_the_run_is_refused_before_any_work(tmp_path, capsys):
    """The run's sampler makes its grids, metrics and card at the end: a sampler whose timesteps cannot sample this
    model at the run's step count (PNDM's Runge-Kutta warm-up at 3 steps) is refused in one line, exit 2, before the
    output folder exists, not after training."""
    out = tmp_path / "run"
    cases = [(["--sampler", "pndm", "--num_inference_steps", "3"], "PNDMScheduler with num_inference_steps=3")]
    for extra, needle in cases:
        argv = ["--output_dir", str(out), "--preset", "digits", "--max_train_steps", "1", "--logger", "none", *extra]
        code = main_in_process(argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and f"--sampler {extra[1]}" in lines[0], lines
        assert not out.exists()


def test_the_readmes_training_command_gives_a_one_line_error_and_never_the_token(tmp_path):
    """`accelerate launch -q training/train.py` (the README's command) with a bad option, or with a token on the
    command line: the trainer's one line ends the output, no launcher traceback, nothing repeats the command line."""
    import re
    import subprocess
    import sys

    from conftest import TRAIN, subprocess_env

    token = "hf_SecretTokenThatMustNeverLeak42"
    for args, expected in (
        (["--learning_rate", "abc"], "error: argument --learning_rate: invalid float value: 'abc'"),
        (["--hub_token", token], "error: --hub_token is not accepted: a token on a command line is visible"),
    ):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", str(TRAIN), *args],
                              cwd=tmp_path, env=subprocess_env(tmp_path, threads=1), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out and token not in out, out[-3000:]
        errors = [line for line in proc.stderr.splitlines() if re.match(r"(error|Error|\w+Error)\b", line)]
        assert len(errors) == 1 and errors[0].startswith(expected), out[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == errors[0]


def test_every_preset_takes_the_datas_channels_and_small_is_the_default_beyond_8x8(tmp_path, caplog):
    """A named preset takes the data's channel count (an RGB folder trains on `digits` or `tiny` as it is); with
    none, 8x8 images get `digits` and every other size `small`, built for its resolution; the paper's UNets only by
    name. `--channels 1` still converts RGB to grayscale on purpose."""
    import numpy as np
    from PIL import Image

    def folder(root, size):
        root.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), mode="RGB").save(root / f"{i}.png")
        return root

    rgb8, rgb16 = folder(tmp_path / "rgb8", 8), folder(tmp_path / "rgb16", 16)
    base = ["--logger", "none", "--train_batch_size", "4", "--max_train_steps", "1", "--num_eval_images", "0",
            "--final_bpd", "none", "--num_quality_samples", "0"]  # fmt: skip

    def unet_of(out):
        return json.loads((out / "unet" / "config.json").read_text())

    for preset in ("digits", "tiny"):
        out = tmp_path / preset
        train_in_process([*base, "--train_data_dir", str(rgb8), "--unet_preset", preset, "--output_dir", str(out)])
        assert (unet_of(out)["in_channels"], unet_of(out)["out_channels"]) == (3, 3), preset
    out = tmp_path / "auto8"
    train_in_process([*base, "--train_data_dir", str(rgb8), "--resolution", "8", "--output_dir", str(out)])
    assert unet_of(out)["in_channels"] == 3 and unet_of(out)["block_out_channels"] == [32, 64]  # digits
    out = tmp_path / "auto16"
    train_in_process([*base, "--train_data_dir", str(rgb16), "--resolution", "16", "--output_dir", str(out)])
    config = unet_of(out)
    assert (config["sample_size"], config["in_channels"], config["block_out_channels"]) == (16, 3, [32, 64, 128])
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]  # attention at 8x8 only
    out = tmp_path / "auto18"  # 18 halves once, to 9x9: said, with a resolution that halves to 4x4
    with caplog.at_level(logging.WARNING, logger="ddpm_hub.train"):
        train_in_process([*base, "--train_data_dir", str(rgb16), "--resolution", "18", "--output_dir", str(out)])
    assert unet_of(out)["block_out_channels"] == [32, 64]
    assert any("--resolution 18 halves only 1 time(s)" in r.getMessage() and "(say 16)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    out = tmp_path / "gray"
    train_in_process([*base, "--train_data_dir", str(rgb8), "--unet_preset", "tiny", "--channels", "1",
                      "--output_dir", str(out)])  # fmt: skip
    assert unet_of(out)["in_channels"] == 1


def test_final_bpd_auto_keeps_the_final_bound_a_fraction_of_the_run_and_says_so_first(tmp_path, caplog):
    """--final_bpd auto (the default): the full bound when its UNet calls (held-out images x T) are at most half the
    training's (3 per image and step), else the stratified estimate, said before training."""
    import logging
    from types import SimpleNamespace

    from ddpm_hub.training.finishing import FinishMixin

    def mode(held: int, steps: int, batch: int, final: str = "auto", processes: int = 1) -> str:
        trainer = SimpleNamespace(
            cfg=SimpleNamespace(final_bpd=final, num_train_timesteps=1000, train_batch_size=batch,
                                gradient_accumulation_steps=1),
            data=SimpleNamespace(held_out=torch.zeros(held, 1, 8, 8, dtype=torch.uint8)), max_steps=steps,
            accelerator=SimpleNamespace(num_processes=processes),
        )  # fmt: skip
        return FinishMixin.final_bpd_mode.fget(trainer)

    assert mode(300, 3000, 128) == "full"  # the digits recipe's size: 300k UNet calls against 1.15M
    assert mode(300, 200, 16) == "estimate"  # a short run: the full bound would cost 30x the training
    assert mode(300, 200, 16, final="full") == "full" and mode(300, 3000, 128, final="estimate") == "estimate"
    assert mode(300, 800, 128) == "estimate" and mode(300, 800, 128, processes=2) == "full"  # every process trains
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        result = train_in_process([*FAST_ARGS, "--final_bpd", "auto", "--eval_bpd_samples", "2", "--max_train_steps",
                                   "2", "--output_dir", str(out)])  # fmt: skip
    assert "final held-out bits/dim: the stratified estimate" in caplog.text
    assert "held_out_bits_per_dim_estimate" in result["metrics"] and "held_out_bits_per_dim" not in result["metrics"]
