"""`python -m ddpm_hub` commands and the pictures they write."""

from __future__ import annotations

import json

from PIL import Image

from ddpm_hub.cli import main


def test_sample_with_ddpm_and_ddim(trained, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(trained), "--num_images", "5", "--steps", "10", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (24, 16)  # 5 images: 3 columns x 2 rows of 8x8
    out4 = tmp_path / "ddim.png"
    args = [
        "sample",
        "--model",
        str(trained),
        "--num_images",
        "4",
        "--steps",
        "5",
        "--scheduler",
        "ddim",
        "--upscale",
        "4",
        "--out",
        str(out4),
    ]
    assert main(args) == 0
    assert Image.open(out4).size == (2 * 34 + 2, 2 * 34 + 2)


def test_evaluate_bpd_estimate_and_full_with_plot(trained, tmp_path):
    out = tmp_path / "eval.json"
    args = [
        "evaluate",
        "--model",
        str(trained),
        "--dataset",
        "digits",
        "--num_images",
        "4",
        "--bpd_estimate",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert (
        result["num_images"] == 4 and result["bits_per_dim_estimate"] > 0 and "bits_per_dim_estimate_stderr" in result
    )


def test_plots(trained, tmp_path):
    for kind in ("forward", "schedules"):
        assert main(["plot", kind, "--out", str(tmp_path / f"{kind}.png")]) == 0
        assert Image.open(tmp_path / f"{kind}.png").size[0] > 100
    args = ["plot", "reverse", "--model", str(trained), "--steps", "10", "--out", str(tmp_path / "reverse.png")]
    assert main(args) == 0
    assert main(["plot", "reverse", "--out", str(tmp_path / "x.png")]) == 2


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--steps", "2"]) == 2
    assert "error:" in capsys.readouterr().err
