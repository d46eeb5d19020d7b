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
