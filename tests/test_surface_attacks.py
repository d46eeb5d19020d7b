"""What a user types wrong, as a user types it: each mistake is one line naming the input, raised before work."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import OfflineModeIsEnabled

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
from ddpm_hub.cli import main as cli
from ddpm_hub.hub_push import HubError, with_retries


@pytest.fixture
def model(tmp_path) -> str:
    torch.manual_seed(0)
    folder = tmp_path / "model"
    DDPMPipeline(unet=create_unet("tiny").eval(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        folder
    )
    return str(folder)


def _one_line_error(argv: list[str], capsys) -> str:
    try:
        code = cli(argv)
    except SystemExit as exc:
        code = exc.code
    raw = capsys.readouterr().err
    lines = [line for line in raw.replace("\r", "\n").splitlines()
             if line.strip() and "Loading pipeline components" not in line]  # fmt: skip
    assert code == 2 and len(lines) == 1 and "Traceback" not in raw, (argv, raw)
    return lines[0]


@pytest.mark.parametrize("flag,value", [("--steps", "2.5"), ("--batch_size", "x"), ("--num_images", "1e3"),
                                        ("--upscale", "")])  # fmt: skip
def test_a_non_integer_count_is_named_as_such(flag, value, capsys):
    line = _one_line_error(["sample", "--model", "m", flag, value], capsys)
    assert f"argument {flag}: must be an integer, got {value!r}" in line and "_positive" not in line, line


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no/such/model", "~nobody/model"])
def test_a_missing_local_model_folder_is_named_as_a_folder(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(["sample", "--model", path, "--out", str(tmp_path / "g.png")], capsys)
    assert line == f"error: {path}: no such local folder (nor a Hub repo id, which looks like ORG/NAME): check the path"


def test_offline_mode_is_reported_at_once_not_retried(monkeypatch):
    calls = []
    monkeypatch.setattr("time.sleep", lambda s: calls.append(("sleep", s)))

    def action():
        calls.append("call")
        raise OfflineModeIsEnabled("offline mode is enabled")

    with pytest.raises(HubError, match=r"^creating org/m: offline mode is on \(HF_HUB_OFFLINE=1\)"):
        with_retries(action, "creating org/m", token=None)
    assert calls == ["call"]


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


def test_no_token_is_reported_at_once_not_retried(monkeypatch):
    from huggingface_hub.errors import LocalTokenNotFoundError

    calls = []
    monkeypatch.setattr("time.sleep", lambda s: calls.append(("sleep", s)))

    def action():
        calls.append("call")
        raise LocalTokenNotFoundError("Token is required")

    with pytest.raises(HubError, match=r"^finding your namespace: no Hub token: log in with `hf auth login`"):
        with_retries(action, "finding your namespace", token=None)
    assert calls == ["call"]


def test_push_checks_the_folder_and_weights_before_asking_the_hub(model, tmp_path, capsys, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked before the arguments were checked")

    monkeypatch.setattr("ddpm_hub.hub_push.resolve_repo_id", no_hub)
    line = _one_line_error(["push", "--folder", model, "--repo_id", "bare-name", "--weights", "raw"], capsys)
    assert "--weights raw is for training checkpoint-N folders only" in line, line
    line = _one_line_error(["push", "--folder", str(tmp_path), "--repo_id", "bare-name"], capsys)
    assert line == f"error: {tmp_path} is not a pipeline folder (no model_index.json): train first, then push"


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


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "3", None, True])
def test_a_non_finite_guidance_scale_is_refused_before_work(scale):
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config({**create_unet("tiny").config, "num_class_embeds": 11})
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=10))

    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran before guidance_scale was checked")

    pipeline.unet.forward = forbidden
    with pytest.raises(ValueError, match=r"^guidance_scale must be a finite number, got"):
        pipeline(class_labels=[3], guidance_scale=scale, num_inference_steps=2)


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
