"""Checks before work: bad arguments of the pipeline, the CLI and the trainer are one-line errors raised before
any model is run, and the data is read as it is (bit depth, channels, local datasets, held-out items)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import FAST_ARGS, REPO, subprocess_env, train_in_process
from PIL import Image

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
from ddpm_hub.cli import main as cli
from ddpm_hub.config import ConfigError, DataConfig, parse_args
from ddpm_hub.data import DataError, load_digits_dataset, load_splits, to_model_image


def _pipeline(T: int = 10) -> DDPMPipeline:
    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=create_unet("tiny").eval(), scheduler=DDPMScheduler(num_train_timesteps=T))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def no_work(monkeypatch):
    """Running the UNet (sampling, bits/dim) fails the test: checks must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(diffusers.UNet2DModel, "forward", forbidden)


# -- the pipeline ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_inference_steps": -1}, "num_inference_steps must be a positive integer, got -1"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer, got 0"),
        ({"num_inference_steps": 1.5}, "num_inference_steps must be a positive integer, got 1.5"),
        ({"num_inference_steps": 11}, "num_inference_steps 11 exceeds the model's 10 training timesteps"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"output_type": "jpg"}, "output_type must be one of"),
    ],
)
@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                       "UniPCMultistepScheduler"])  # fmt: skip
def test_pipeline_checks_its_arguments_before_any_work(no_work, kwargs, needle, scheduler):
    pipeline = _pipeline()
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        pipeline(**{"num_inference_steps": 2, **kwargs})


def test_latent_output_is_the_array_stock_ddpm_pipeline_returns():
    pipeline = _pipeline()
    stock = diffusers.DDPMPipeline(unet=pipeline.unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    stock.set_progress_bar_config(disable=True)

    def run(p, output_type):
        return p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                 output_type=output_type).images  # fmt: skip

    ours = run(pipeline, "latent")
    theirs = run(stock, "latent")
    assert isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray)
    assert ours.shape == theirs.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours, run(pipeline, "np"))


def test_raw_weights_need_a_checkpoint_folder(tmp_path):
    _pipeline().save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="checkpoint-N folders only"):
        DDPMPipeline.from_pretrained(tmp_path / "pipe", weights="raw")


def test_unknown_hub_id_is_one_line_naming_it(hub, tmp_path):
    with pytest.raises(OSError, match="no Hub model repo 'org/nope'") as exc:
        DDPMPipeline.from_pretrained("org/nope", cache_dir=tmp_path / "cache")
    assert "\n" not in str(exc.value)
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="0")
    proc = subprocess.run([sys.executable, "-m", "ddpm_hub", "sample", "--model", "org/nope"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: org/nope: no such local folder, and no Hub model repo 'org/nope'")


# -- the command line ---------------------------------------------------------------------------------------


@pytest.fixture
def model_1000(tmp_path) -> str:
    folder = tmp_path / "model"
    _pipeline(T=1000).save_pretrained(folder)
    return str(folder)


def test_cli_checks_before_work_in_one_line(model_1000, tmp_path, capsys, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    unwritable = str(a_file / "x.png")  # a folder that cannot exist: its parent is a file
    sample = ["sample", "--model", model_1000]
    evaluate = ["evaluate", "--model", model_1000, "--num_images", "4"]
    cases = [
        ([*sample, "--steps", "1001"], "--steps 1001 exceeds the model's 1000 training timesteps"),
        ([*sample, "--steps", "1001", "--sampler", "unipc"], "--steps 1001 exceeds the model's 1000"),
        ([*sample, "--sampler", "ddpm", "--out", unwritable], f"--out {unwritable}: cannot write"),
        ([*sample, "--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
        ([*sample, "--out", str(tmp_path / "grid.foo")], ".foo file extension is not an image format"),
        ([*sample, "--out_dir", str(a_file)], f"--out_dir {a_file}: cannot write"),
        ([*sample, "--weights", "raw"], "is for training checkpoint-N folders only"),
        ([*evaluate, "--bpd", "--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
        ([*evaluate, "--bpd", "--out", str(a_file / "r.json")], "cannot write"),
        ([*evaluate, "--bpd", "--vlb_plot", str(tmp_path)], f"--vlb_plot {tmp_path} is a directory"),
        ([*evaluate, "--bpd", "--vlb_plot", unwritable], f"--vlb_plot {unwritable}: cannot write"),
        ([*evaluate, "--bpd_estimate", "--vlb_plot", str(tmp_path / "v.png")], "add --bpd"),
        ([*evaluate, "--bpd_estimate", "--num_images", "-1"], "--num_images: must be >= 0 (0: all), got -1"),
        ([*evaluate, "--bpd", "--digits_fid", "--num_images", "8", "--steps", "1001"], "--steps 1001 exceeds"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*sample, "--device", "cuda"], "--device cuda: no cuda device is available"))
    if Path("/proc").is_dir():
        cases.append(([*sample, "--sampler", "ddpm", "--out", "/proc/x.png"], "--out /proc/x.png: cannot write"))
    for argv, needle in cases:
        try:
            code = cli(argv)
        except SystemExit as exc:
            code = exc.code
        raw = capsys.readouterr().err
        lines = [line for line in raw.replace("\r", "\n").splitlines()
                 if line.strip() and "Loading pipeline components" not in line]  # fmt: skip  # diffusers' bar
        assert code == 2, (argv, raw)
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in raw, (argv, raw)
        assert needle in lines[0] and "to train on" not in lines[0], (argv, raw)


def test_vlb_plot_with_the_full_bound_is_written(tmp_path):
    folder = tmp_path / "model"
    _pipeline(T=20).save_pretrained(folder)
    plot, out = tmp_path / "plots" / "vlb.png", tmp_path / "json" / "r.json"
    assert cli(["evaluate", "--model", str(folder), "--num_images", "2", "--bpd", "--vlb_plot", str(plot),
                "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(plot).size[0] > 100 and json.loads(out.read_text())["num_images"] == 2


# -- the trainer ----------------------------------------------------------------------------------------------


def _folder(root: Path, images: dict[str, Image.Image]) -> Path:
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
    data = _folder(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(16)})
    result = train_in_process([*FAST_ARGS, "--train_data_dir", str(data), "--train_batch_size", "4", "--num_epochs",
                               "2", "--num_eval_images", "0", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert result["steps"] == 2 * 16 // 4


def test_fewer_images_than_a_batch_per_process_is_an_error_before_training(tmp_path):
    data = _folder(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(40)})
    args = ["--train_data_dir", str(data), "--train_batch_size", "32"]
    assert _prepare(args).num_train == 40  # one process: one batch of 32 per epoch
    with pytest.raises(ConfigError, match="--train_batch_size 32 x 2 processes needs at least 64 training images, "
                                          "the data has 40"):  # fmt: skip
        _prepare(args, num_processes=2)


@pytest.mark.slow
def test_two_processes_with_fewer_images_than_two_batches_stop_before_training(tmp_path):
    """The real launch: each of 2 processes would get no full batch (a ZeroDivisionError in the loop before)."""
    from conftest import run_train

    data = _folder(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(40)})
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


def test_an_image_column_of_labels_is_a_one_line_error():
    needle = (
        r"--image_column 'label' of the train split holds ClassLabel values, not images; image columns: \['image'\]"
    )
    with pytest.raises(DataError, match=needle):
        load_splits(DataConfig(dataset_name="digits", image_column="label"))


def test_saved_datasets_and_single_data_files_load_as_dataset_name(tmp_path):
    dd = load_digits_dataset()
    small = type(dd)({"train": dd["train"].select(range(40)), "test": dd["test"].select(range(10))})
    small.save_to_disk(str(tmp_path / "saved_dict"))
    small["train"].save_to_disk(str(tmp_path / "saved_one"))
    small["train"].to_parquet(str(tmp_path / "train.parquet"))
    cache = str(tmp_path / "cache")
    train, held = load_splits(DataConfig(dataset_name=str(tmp_path / "saved_dict"), cache_dir=cache))
    assert (len(train), len(held)) == (40, 10)
    for source in ("saved_one", "train.parquet"):
        train, held = load_splits(DataConfig(dataset_name=str(tmp_path / source), cache_dir=cache))
        assert len(train) == 40 and held is None, source
        stored = Image.open(io.BytesIO(train[3]["image"]["bytes"]))
        np.testing.assert_array_equal(np.asarray(stored), np.asarray(dd["train"][3]["image"]))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: a .txt file is not a data file"):
        load_splits(DataConfig(dataset_name=str(tmp_path / "notes.txt")))
    out = tmp_path / "eval.json"  # evaluate takes the saved folder as --dataset, too
    _pipeline(T=20).save_pretrained(tmp_path / "model")
    assert cli(["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "saved_dict"),
                "--num_images", "3", "--bpd_estimate", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["num_images"] == 3


def test_sixteen_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    for value in (0, 257, 32896, 65535):  # a constant image keeps its brightness: x * 255 / 65535
        image = Image.fromarray(np.full((8, 8), value, dtype=np.uint16))
        assert image.mode == "I;16"
        assert (to_model_image(image, 8, 1) == round(value * 255 / 65535)).all(), value
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    np.testing.assert_array_equal(to_model_image(Image.open(tmp_path / "ramp.png"), 8, 1)[0],
                                  np.round(ramp * (255 / 65535)).astype(np.uint8))  # fmt: skip


@pytest.mark.parametrize("first,rest,expected", [(_gray, _rgb, 3), (_rgb, _gray, 1)])
def test_channels_come_from_the_majority_of_the_data_with_a_log_line(tmp_path, caplog, first, rest, expected):
    images = {"0.png": first(0), "1.png": rest(1), "2.png": rest(2)}
    data = _folder(tmp_path / "imgs", images)
    with caplog.at_level(logging.WARNING):
        prepared = _prepare(["--train_data_dir", str(data), "--train_batch_size", "2", "--unet_preset", "tiny"])
    assert prepared.channels == expected and prepared.train[0][0].shape[0] == expected
    kinds = ("1 grayscale and 2 colour", "2 grayscale and 1 colour")[expected == 1]
    assert f"mixes {kinds} images: converting all to {'RGB' if expected == 3 else 'grayscale'}" in caplog.text


def test_bad_held_out_images_are_skipped_only_when_asked(tmp_path, caplog):
    root = tmp_path / "data"
    _folder(root / "train", {f"{i}.png": _gray(i) for i in range(4)})
    _folder(root / "test", {f"{i}.png": _gray(i) for i in range(2)})
    (root / "test" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    args = ["--train_data_dir", str(root), "--train_batch_size", "2", "--channels", "1"]
    with pytest.raises(DataError, match=r"broken\.png.*--skip_bad_images"):
        _prepare(args)
    with caplog.at_level(logging.WARNING):
        assert _prepare([*args, "--skip_bad_images"]).held_out.shape[0] == 2
    assert "skipped 1 unreadable held-out images" in caplog.text


def test_no_held_out_split_is_said_before_training(tmp_path, caplog):
    data = _folder(tmp_path / "imgs", {f"{i}.png": _gray(i) for i in range(4)})
    with caplog.at_level(logging.WARNING):
        prepared = _prepare(["--train_data_dir", str(data), "--train_batch_size", "2", "--final_bpd", "estimate"])
    assert prepared.held_out is None
    assert "no held-out split: no held-out bits/dim (--final_bpd estimate)" in caplog.text


def test_train_help_answers_before_torch_is_imported(tmp_path):
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["train.py", "--help"]
        try:
            runpy.run_path({str(REPO / "training" / "train.py")!r}, run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "datasets", "accelerate"))
        print("HEAVY", heavy)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(tmp_path), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--num_epochs" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout[-500:]
