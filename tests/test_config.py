"""The trainer's options: presets (as the README states them), config files (nested, aliases, hostile ones), flags
and their diffusers names, `--help` (fast, with the values a run would use), and bad values as one-line errors
naming the option, before any work."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, subprocess_env

from ddpm_hub.config import ConfigError, build_config, parse_args

# -- help --------------------------------------------------------------------------------------------------------------


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


# -- presets, config files and flags -----------------------------------------------------------------------------------


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


def test_config_file_and_cli_precedence(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: digits\nlearning_rate: 0.01\ntrain_batch_size: 64\n")
    cfg = build_config({"train_batch_size": 16}, str(path))
    assert cfg.learning_rate == 0.01 and cfg.train_batch_size == 16 and cfg.beta_schedule == "squaredcos_cap_v2"
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(ConfigError, match="learning_rat"):
        build_config({}, str(tmp_path / "bad.json"))
    cifar = build_config({"preset": "cifar10"})
    assert (cifar.learning_rate, cifar.train_batch_size, cifar.lr_warmup_steps, cifar.max_train_steps) == (
        2e-4,
        128,
        5000,
        800_000,
    )
    assert cifar.random_flip and cifar.dataset_name == "uoft-cs/cifar10" and cifar.ema_max_decay == 0.9999


def _readme() -> str:
    from conftest import REPO

    return (REPO / "README.md").read_text()


def test_the_readme_preset_table_states_each_digits_recipe_as_configured():
    from ddpm_hub.config import TRAINING_PRESETS

    rows = {line.split("|")[1].strip().split()[0].strip("`"): line for line in _readme().splitlines()
            if line.startswith("| `digits")}  # fmt: skip
    for name in ("digits", "digits_fast"):
        preset = TRAINING_PRESETS[name]
        row = rows[name]
        assert f"batch {preset['train_batch_size']}," in row and f"{preset['max_train_steps']:,} steps" in row, row
        assert ("v-prediction" in row) == (preset["prediction_type"] == "v_prediction"), row


def test_what_make_train_gives_describes_the_digits_preset():
    from ddpm_hub.config import TRAINING_PRESETS

    preset = TRAINING_PRESETS["digits"]
    section = _readme().split("## What `make train` gives", 1)[1].split("##", 1)[0]
    assert f"{preset['max_train_steps']:,} steps of batch {preset['train_batch_size']}" in section


# -- bad values: one line naming the option ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"max_train_steps": -5}, "--max_train_steps"),
        ({"beta_schedule": "bogus"}, "--beta_schedule"),
        ({"learning_rate": 0}, "--learning_rate"),
        ({"loss_type": "hybrid", "variance_type": "fixed_small"}, "--variance_type learned_range"),
        ({"variance_type": "learned_range", "loss_type": "simple"}, "--loss_type hybrid or vlb"),
        ({"mixed_precision": "fp4"}, "--mixed_precision"),
        ({"lr_scheduler": "piecewise_constant"}, "--lr_scheduler"),
        ({"variance_type": "learned", "loss_type": "hybrid"}, "learned_range"),
        ({"logger": "nonsense"}, "--logger"),
        ({"channels": 2}, "--channels"),
        ({"unet_preset": "tiny", "model_config_name_or_path": "x.json"}, "not both"),
        ({"train_data_dir": "/no/such/folder"}, "--train_data_dir"),
        ({"ema_max_decay": 1.5}, "--ema_max_decay"),
        ({"num_inference_steps": 2000}, "--num_inference_steps"),
        ({"train_batch_size": 2.5}, "--train_batch_size"),
        ({"dataset_name": "x/y", "train_data_dir": "d"}, "not both"),
        ({"resume_from_checkpoint": "/nope"}, "--resume_from_checkpoint"),
        ({"preset": "nope"}, "--preset"),
    ],
)
def test_bad_config_values_name_the_argument(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        build_config(override)


@pytest.mark.parametrize("argv,needle", [
    (["--train_batch_size", "2.5"], "error: argument --train_batch_size: invalid int value: '2.5'"),
    (["--preset", "nope"], "error: argument --preset: invalid choice: 'nope'"),
    (["--logger", "foo"], "error: argument --logger/--report_to: invalid choice: 'foo'"),
])  # fmt: skip
def test_train_flag_type_errors_are_one_line_without_the_usage_of_every_option(argv, needle, capsys):
    from ddpm_hub.config import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith(needle), err


def test_train_refuses_an_unusable_output_dir_or_a_missing_local_model_before_work(tmp_path):
    from ddpm_hub.config import ConfigError, parse_args

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--output_dir", str(a_file)], f"--output_dir {a_file} is a file: give a folder"),
        (["--output_dir", str(a_file / "run")], f"--output_dir {a_file / 'run'}: {a_file} is a file"),
        (["--pretrained_model_name_or_path", str(tmp_path / "nope")], "no such local file or folder"),
        (["--model_config_name_or_path", "./no/such/unet.json"], "no such local file or folder"),
    ]
    for argv, needle in cases:
        with pytest.raises(ConfigError, match=None) as exc:
            parse_args(argv)
        assert needle in str(exc.value) and "\n" not in str(exc.value), (argv, str(exc.value))
    assert not (tmp_path / "run").exists()
    config = parse_args(["--output_dir", str(tmp_path / "new" / "run")])  # a folder that can be created is fine
    assert config.output_dir == str(tmp_path / "new" / "run") and not (tmp_path / "new").exists()


def _alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" under one option: 9 ** levels items from a few hundred bytes of YAML anchors and aliases."""
    names = "abcdefghijklmnop"[:levels]
    lines = ["learning_rate:", f"  {names[0]}: &{names[0]} [x,x,x,x,x,x,x,x,x]"]
    lines += [f"  {n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip(names[:-1], names[1:], strict=True)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_config_is_one_short_line_naming_the_option_and_file(tmp_path):
    from ddpm_hub.config import ConfigError, build_config, parse_args

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert len(bomb.read_bytes()) < 400
    for load in (lambda: build_config({}, str(bomb)), lambda: parse_args(["--config", str(bomb)])):
        with pytest.raises(ConfigError) as exc:
            load()
        message = str(exc.value)
        assert "\n" not in message and len(message) < 300, message
        assert str(bomb) in message and "learning_rate" in message and "alias" in message, message
    # a config file needs no anchors: even a harmless one is refused, naming the option under the section
    plain = tmp_path / "anchor.yaml"
    plain.write_text("optim:\n  learning_rate: &lr 0.01\n")
    with pytest.raises(ConfigError, match=r"line 2: option learning_rate uses a YAML anchor \(&lr\)"):
        build_config({}, str(plain))
    plain.write_text("optim:\n  learning_rate: 0.01\n  adam_beta1: 0.8\n")  # the same file written out loads
    assert (build_config({}, str(plain)).learning_rate, build_config({}, str(plain)).adam_beta1) == (0.01, 0.8)


CONFIG_ATTACKS = [  # (file name, text, what the one-line message says)
    ("big.json", '{"learning_rate": [' + ",".join(["0"] * 600_000) + "]}", "larger than 1 MB"),
    ("wide.json", '{"learning_rate": [' + ",".join(["0"] * 100_000) + "]}", "--learning_rate must be a number, got [0"),
    ("deep.json", '{"learning_rate": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("nested.json", '{"optim": {"learning_rate": ' + "[" * 500 + "]" * 500 + "}}", "must be a number, got [[[["),
    ("deep.yaml", "learning_rate: " + "[" * 200_000 + "]" * 200_000 + "\n", "nested more than 32 levels deep"),
    ("key.yaml", "k" * 1000 + ": 1\n", "unknown option 'kkkk"),
    ("bad.yaml", "learning_rate: [1, 2\nfoo: bar\n", "cannot parse (while parsing a flow sequence"),
    ("list.yaml", "- " + "x" * 10_000 + "\n", "expected a mapping of option names to values, got ['xxx"),
    ("preset.yaml", "preset: [" + ",".join(["1"] * 10_000) + "]\n", "--preset [1, 1, 1"),
    ("bytes.yaml", "learning_rate: \udcff\n", "not UTF-8 text"),
]  # fmt: skip


@pytest.mark.parametrize("name,text,needle", CONFIG_ATTACKS, ids=[case[0] for case in CONFIG_ATTACKS])
def test_a_huge_or_deeply_nested_config_value_is_one_short_line(tmp_path, name, text, needle):
    from ddpm_hub.config import ConfigError, build_config

    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as exc:
        build_config({}, str(path))
    message = str(exc.value)
    assert "\n" not in message and len(message) < 300 + len(str(path)) and needle in message, message
    assert str(path) in message or name == "preset.yaml", message  # an unknown preset is named, not its source


@pytest.mark.parametrize("option", ["output_dir", "train_data_dir", "resume_from_checkpoint",
                                    "pretrained_model_name_or_path"])  # fmt: skip
def test_a_path_the_system_cannot_look_up_is_one_line_naming_the_option(option):
    from ddpm_hub.config import ConfigError, build_config

    value = "./" + "x" * 5000  # longer than any file name may be
    with pytest.raises(ConfigError) as exc:
        build_config({option: value})
    message = str(exc.value)
    assert message.startswith(f"--{option} ./xxx") and "not a usable path" in message, message
    assert "\n" not in message and len(message) < 300, message
    with pytest.raises(ConfigError, match="--output_dir ~nosuchuser_ddpm/run: not a usable path"):
        build_config({"output_dir": "~nosuchuser_ddpm/run"})


def test_logging_dir_stays_inside_the_output_folder(tmp_path):
    from ddpm_hub.config import ConfigError, parse_args

    for value in ("../escape", str(tmp_path / "abs"), "~/logs", "a/../../b"):
        with pytest.raises(ConfigError, match="a folder inside --output_dir"):
            parse_args(["--logging_dir", value, "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--logging_dir .*not a usable path"):
        parse_args(["--logging_dir", "x" * 5000, "--output_dir", str(tmp_path / "o")])
    assert parse_args(["--logging_dir", "logs/tb", "--output_dir", str(tmp_path / "o")]).logging_dir == "logs/tb"


def test_a_preset_with_data_the_user_names_trains_on_that_data(tmp_path):
    """defaults < preset < file < CLI: `--preset digits_fast --train_data_dir DIR` trains the preset's recipe on DIR
    (the preset's data set, its config and image column give way), and `--preset cifar10 --dataset_name X` on X."""
    from ddpm_hub.config import build_config

    folder = tmp_path / "imgs"
    folder.mkdir()
    for preset in ("digits", "digits_fast", "cifar10"):
        cfg = build_config({"preset": preset, "train_data_dir": str(folder), "resolution": 16})
        assert (cfg.train_data_dir, cfg.dataset_name, cfg.image_column) == (str(folder), None, "image"), preset
    cfg = build_config({"preset": "digits_fast", "train_data_dir": str(folder), "resolution": 16})
    assert (cfg.prediction_type, cfg.max_train_steps) == ("v_prediction", 1600)  # the recipe stays
    cfg = build_config({"preset": "cifar10", "dataset_name": "me/faces", "image_column": "pic"})
    assert (cfg.dataset_name, cfg.image_column, cfg.train_data_dir) == ("me/faces", "pic", None)


def test_a_data_folder_that_is_a_file_or_missing_is_named_for_what_it_is(tmp_path):
    """`--train_data_dir` (or `--validation_data_dir`) naming a file says it is not a directory; a missing path says
    there is no such directory."""
    afile = tmp_path / "images.zip"
    afile.write_bytes(b"x")
    for name in ("train_data_dir", "validation_data_dir"):
        with pytest.raises(ConfigError, match=f"--{name} .*images.zip: not a directory"):
            build_config({"train_data_dir": str(tmp_path), name: str(afile)})
        with pytest.raises(ConfigError, match=f"--{name} .*nope: no such directory"):
            build_config({"train_data_dir": str(tmp_path), name: str(tmp_path / "nope")})
