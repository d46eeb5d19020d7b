"""The training layer's contracts: one config source, accelerate owns the machine, datasets owns the data,
any UNet and fine-tuning. Mostly in-process (`train_in_process`); `accelerate launch` where the launcher matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.tracking import GeneralTracker
from conftest import FAST_ARGS, TRAIN, read_metrics, subprocess_env, train_in_process
from PIL import Image
from safetensors.torch import load_file

from ddpm_hub.config import ConfigError, build_config, parse_args
from ddpm_hub.runtime import cpu_threads, physical_cores


def test_help_shows_the_values_a_run_would_use_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    # no arguments -> the digits preset: its values, not the dataclass defaults
    assert "peak learning rate (default: 0.002)" in text
    assert "the beta_t schedule (default: squaredcos_cap_v2)" in text
    assert "{linear,scaled_linear,squaredcos_cap_v2,sigmoid,laplace}" in text
    assert "(default: digits)" in text and "(default: None) (default" not in text
    with pytest.raises(SystemExit):
        parse_args(["--preset", "cifar10", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (default: 0.0002)" in text and "linear warm-up steps (default: 5000)" in text


def test_every_enumerated_option_shows_all_its_choices_in_help(capsys):
    from ddpm_hub.config import FIELDS

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    enumerated = {name: f.metadata["choices"] for name, f in FIELDS.items() if f.metadata.get("choices")}
    assert {"beta_schedule", "prediction_type", "variance_type", "loss_type", "sampler", "logger"} <= set(enumerated)
    for name, choices in enumerated.items():
        shown = "{" + ",".join(str(c) for c in choices) + "}"
        assert f"--{name} {shown}" in text, name


def test_naming_only_the_variance_or_only_the_loss_makes_the_other_fit():
    fast = {"preset": "digits_fast"}  # learned-range variance trained by the hybrid loss
    assert (build_config(fast).variance_type, build_config(fast).loss_type) == ("learned_range", "hybrid")
    assert build_config({**fast, "variance_type": "fixed_small"}).loss_type == "simple"
    assert build_config({**fast, "loss_type": "simple"}).variance_type == "fixed_small"
    assert build_config({**fast, "loss_type": "vlb"}).variance_type == "learned_range"
    preset = build_config({})  # digits: fixed variance with L_simple
    assert (preset.variance_type, preset.loss_type) == ("fixed_small", "simple")
    assert build_config({"variance_type": "learned_range"}).loss_type == "hybrid"
    assert build_config({"loss_type": "hybrid"}).variance_type == "learned_range"
    cifar = {"preset": "cifar10"}  # fixed_large with L_simple
    assert build_config({**cifar, "variance_type": "learned_range"}).loss_type == "hybrid"
    assert build_config({**cifar, "loss_type": "hybrid"}).variance_type == "learned_range"
    assert build_config({**cifar, "loss_type": "vlb"}).variance_type == "fixed_large"
    with pytest.raises(ConfigError, match="--loss_type hybrid trains a learned variance"):
        build_config({**fast, "variance_type": "fixed_small", "loss_type": "hybrid"})  # both named: the user's mistake


def test_diffusers_flag_names_are_aliases_and_config_files_may_nest(tmp_path):
    cfg = parse_args(["--ddpm_num_steps", "50", "--ddpm_beta_schedule", "linear", "--ddpm_num_inference_steps",
                         "20", "--report_to", "none", "--use_ema", "false"])  # fmt: skip
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.num_inference_steps) == (50, "linear", 20)
    assert cfg.logger == "none" and cfg.use_ema is False and cfg.diffusion.num_train_timesteps == 50
    path = tmp_path / "nested.yaml"
    path.write_text(
        "preset: digits\noptim:\n  learning_rate: 0.01\ndiffusion:\n  ddpm_num_steps: 100\n"
        "run:\n  num_inference_steps: 100\n"
    )
    cfg = build_config({}, str(path))
    assert cfg.learning_rate == 0.01 and cfg.num_train_timesteps == 100 and cfg.beta_schedule == "squaredcos_cap_v2"
    path.write_text("optim:\n  resolution: 32\n")
    with pytest.raises(ConfigError, match="'resolution' is not an option of section 'optim'"):
        build_config({}, str(path))
    assert set(cfg.to_dict()) >= {"learning_rate", "resolution", "num_inference_steps", "preset"}


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


class RecordingTracker(GeneralTracker):
    """A custom accelerate tracker (what wandb, mlflow, ... plug into) that records what it is given."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.config: dict = {}
        self.logs: list[tuple[int | None, dict]] = []
        self.images: list[int | None] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logs.append((step, dict(values)))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        assert all(isinstance(v[0], np.ndarray) for v in values.values())
        self.images.append(step)


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


def _folder(root, n, mode="RGB", size=8, seed=0):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / f"img{i}.png")
    return root


def test_channels_come_from_the_data_and_a_disagreeing_preset_is_an_error(tmp_path):
    rgb = _folder(tmp_path / "rgb", 8)
    base = ["--logger", "none", "--train_batch_size", "4", "--max_train_steps", "1", "--num_eval_images", "0",
            "--final_bpd", "none", "--train_data_dir", str(rgb)]  # fmt: skip
    with pytest.raises(ConfigError, match=r"the data has 3 channel\(s\) but UNet preset 'digits' takes 1"):
        train_in_process([*base, "--unet_preset", "digits", "--output_dir", str(tmp_path / "x")])
    # no preset: one is chosen for the resolution, with the data's channels
    out = tmp_path / "auto"
    train_in_process([*base, "--resolution", "8", "--output_dir", str(out)])
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["in_channels"] == 3 and config["out_channels"] == 3 and config["block_out_channels"] == [32, 64]
    # --channels 1 converts RGB to grayscale on purpose
    out = tmp_path / "gray"
    train_in_process([*base, "--unet_preset", "tiny", "--channels", "1", "--output_dir", str(out)])
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 1


def test_image_folder_with_test_split_reports_held_out_bits_per_dim(tmp_path):
    root = tmp_path / "data"
    _folder(root / "train", 8, mode="L")
    _folder(root / "test", 3, mode="L", seed=1)
    for split, n in (("train", 8), ("test", 3)):  # imagefolder: a metadata.jsonl lists every image of its split
        (root / split / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"img{i}.png", "label": i % 2}) + "\n" for i in range(n))
        )
    args = [*FAST_ARGS, "--train_data_dir", str(root), "--train_batch_size", "4", "--max_train_steps", "2",
            "--final_bpd", "estimate", "--eval_bpd_samples", "2", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    result = train_in_process(args)
    assert result["metrics"]["held_out_bits_per_dim_estimate"] > 0


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


def test_no_unused_dependency():
    """Every declared runtime dependency is imported somewhere in the package (transformers was not)."""
    from pathlib import Path

    import tomllib

    repo = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps]
    source = "\n".join(p.read_text() for folder in ("ddpm_hub", "pipelines", "training") for p in
                       (repo / folder).rglob("*.py"))  # fmt: skip
    imports = {"scikit-learn": "sklearn", "huggingface-hub": "huggingface_hub", "pyyaml": "yaml", "pillow": "PIL"}
    through_other_libraries = {"tensorboard", "safetensors"}  # used by accelerate (tracker) and diffusers (weights)
    for name in set(names) - through_other_libraries:
        module = imports.get(name, name.replace("-", "_"))
        assert f"import {module}" in source or f"from {module}" in source, name
    assert os.environ.get("HF_ENDPOINT", "").startswith("http://127.0.0.1")
    assert torch.get_num_threads() >= 1


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
