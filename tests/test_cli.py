"""`python -m ddpm_hub` commands and the pictures they write; mistakes are one line naming the input, exit 2,
before any work; `sample` output is written crash-safely (one writer, no partial file, no write through a link)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, tiny_pipeline
from PIL import Image

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
from ddpm_hub.cli import main


def test_sample_with_ddpm_and_ddim(trained, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(trained), "--num_images", "5", "--steps", "10", "--upscale", "1",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    image = Image.open(out)
    assert image.size == (24, 16)  # 5 images: 3 columns x 2 rows of 8x8
    assert main(args[:-4] + ["--out", str(out)]) == 0  # default: small images enlarged to ~64 px, 2 px apart
    assert Image.open(out).size == (3 * 66 + 2, 2 * 66 + 2)
    out4 = tmp_path / "ddim.png"
    args = [
        "sample",
        "--model",
        str(trained),
        "--num_images",
        "4",
        "--steps",
        "5",
        "--sampler",
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


def test_vlb_plot_with_the_full_bound_is_written(tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline(T=20).save_pretrained(folder)
    plot, out = tmp_path / "plots" / "vlb.png", tmp_path / "json" / "r.json"
    assert main(["evaluate", "--model", str(folder), "--num_images", "2", "--bpd", "--vlb_plot", str(plot),
                "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(plot).size[0] > 100 and json.loads(out.read_text())["num_images"] == 2


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--steps", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_sample_writes_every_image_as_png_and_one_npz(trained, tmp_path):
    import numpy as np

    out_dir = tmp_path / "samples"
    assert main(["sample", "--model", str(trained), "--num_images", "6", "--steps", "4", "--batch_size", "4",
                 "--out_dir", str(out_dir)]) == 0  # fmt: skip
    pngs = sorted(out_dir.glob("*.png"))
    arrays = np.load(out_dir / "samples.npz")["arr_0"]
    assert len(pngs) == 6 and arrays.shape == (6, 8, 8, 1) and arrays.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[5])), arrays[5, ..., 0])
    assert not (tmp_path / "grid.png").exists()
    # the trainer's and the pipeline's name for the step count works too, with the same result
    again = tmp_path / "again"
    assert main(["sample", "--model", str(trained), "--num_images", "6", "--num_inference_steps", "4",
                 "--batch_size", "4", "--out_dir", str(again)]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(again / "samples.npz")["arr_0"], arrays)


def test_user_errors_are_one_line_and_exit_2(trained, tmp_path, capsys):
    import importlib.util

    cases = [
        ["plot", "forward", "--beta_schedule", "cosine"],
        ["sample", "--model", str(trained), "--sampler", "bogus"],
        ["sample", "--model", str(trained), "--steps", "0"],
        ["evaluate", "--model", str(trained)],  # no metric asked for
        ["evaluate", "--model", str(tmp_path / "missing"), "--bpd"],
    ]
    if importlib.util.find_spec("torch_fidelity") is None:  # found before any sampling
        cases.append(["evaluate", "--model", str(trained), "--fid", "--num_images", "100000"])
    for argv in cases:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, argv
        assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


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
        line = one_line_error(argv, capsys)  # exit 2, one line, no traceback
        assert line.startswith("error:") and needle in line and "to train on" not in line, (argv, line)


@pytest.mark.parametrize("flag,value", [("--steps", "2.5"), ("--batch_size", "x"), ("--num_images", "1e3"),
                                        ("--upscale", "")])  # fmt: skip
def test_a_non_integer_count_is_named_as_such(flag, value, capsys):
    line = one_line_error(["sample", "--model", "m", flag, value], capsys)
    assert f"argument {flag}: must be an integer, got {value!r}" in line and "_positive" not in line, line


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no/such/model", "~nobody/model"])
def test_a_missing_local_model_folder_is_named_as_a_folder(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(["sample", "--model", path, "--out", str(tmp_path / "g.png")], capsys)
    assert line == f"error: {path}: no such local folder (nor a Hub repo id, which looks like ORG/NAME): check the path"


def test_evaluate_refuses_the_default_digits_for_a_model_of_another_shape(tmp_path, capsys):
    """`evaluate` without --dataset uses the digits only for 8x8 grayscale models; any other shape is one line
    asking for --dataset (never a bound of resized digits)."""
    from ddpm_hub.cli import main

    unet = create_unet("tiny", sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "m16")
    assert main(["evaluate", "--model", str(tmp_path / "m16"), "--bpd_estimate", "--num_images", "2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: evaluate: this model makes 16x16x1 images and the default --dataset (digits)")
    assert "pass --dataset" in last


def test_help_is_fast_because_nothing_heavy_is_imported():
    import subprocess
    import sys

    code = "import sys; from ddpm_hub.cli import build_parser; build_parser(); print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('torch', 'diffusers', 'datasets', 'huggingface_hub', 'accelerate')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ddpm_hub", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sample" in proc.stdout


def test_checkpoints_are_models(trained, tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from ddpm_hub import DDPMPipeline

    checkpoint = trained / "checkpoints" / "checkpoint-2"
    ema = DDPMPipeline.from_pretrained(checkpoint)
    raw = DDPMPipeline.from_pretrained(checkpoint, weights="raw")
    for pipeline, folder in ((ema, "unet_ema"), (raw, "unet")):
        saved = load_file(checkpoint / folder / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(pipeline.unet.state_dict()[k], v) for k, v in saved.items())
    assert ema.scheduler.config.num_train_timesteps == raw.scheduler.config.num_train_timesteps
    out = tmp_path / "ckpt.png"
    assert main(["sample", "--model", str(checkpoint), "--weights", "raw", "--steps", "3", "--out", str(out)]) == 0
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(checkpoint), "--num_images", "4", "--bpd_estimate",
                 "--out", str(result)]) == 0  # fmt: skip
    assert np.isfinite(json.loads(result.read_text())["bits_per_dim_estimate"])


def test_damaged_weights_are_named_as_damaged(trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["sample", "--model", str(folder), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "damaged safetensors file (truncated" in err and "diffusion_pytorch_model.safetensors" in err
    weights.write_bytes(b"\xff" * 8 + b"{}")
    assert main(["sample", "--model", str(folder), "--steps", "2"]) == 2
    assert "damaged safetensors file" in capsys.readouterr().err


def test_evaluate_digits_fid_reports_both_spaces_with_seed_intervals(trained, tmp_path, capsys):
    """One table with both feature spaces; its numbers are those of the metrics API on the same paired seeds."""
    from ddpm_hub import metrics
    from ddpm_hub.cli import load_pipeline
    from ddpm_hub.digits_features import SPACES, digits_arrays

    out = tmp_path / "digits.json"
    assert main(["evaluate", "--model", str(trained), "--digits_fid", "--num_images", "40", "--num_samples", "24",
                 "--num_seeds", "2", "--seed", "5", "--steps", "4", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    table = printed[printed.index("| metric | digits_mlp | digits_conv |"):].strip().splitlines()
    labels = [row.split("|")[1].strip() for row in table[2:]]
    assert labels == ["FID", "KID (raw, not x 1000)", "precision (k=3)", "recall (k=3)", "class-frequency error",
                      "classifier score (max 10)"]  # fmt: skip
    assert "24 samples x 2 seed(s) against 40 real images" in printed
    assert all(row.count("+-") == 2 for row in table[2:])  # mean +- half-width in both spaces

    result = json.loads(out.read_text())
    real = digits_arrays("test")[0][:40]
    pipeline = load_pipeline(str(trained), "dpm")  # the default sampler
    expected = metrics.sample_quality_report(pipeline, real, num_samples=24, num_inference_steps=4, seeds=(5, 6))
    assert result["seeds"] == [5, 6] and result["num_samples"] == 24 and result["sampler"] == "dpm"
    assert result["digits_per_seed"] == expected["per_seed"]
    for space in SPACES:
        for metric in metrics.DIGITS_METRICS:
            stat = expected["summary"][f"{space}_{metric}"]
            assert result[f"{space}_{metric}"] == stat["mean"]
            assert result[f"{space}_{metric}_ci95"] == stat["half_width"]
    fid = expected["summary"]["digits_conv_fid"]
    assert f"| FID | {expected['summary']['digits_mlp_fid']['mean']:.4g} +- " in printed
    assert f"{fid['mean']:.4g} +- {fid['half_width']:.2g} |" in printed


def test_evaluate_digits_fid_needs_four_images(trained, capsys):
    assert main(["evaluate", "--model", str(trained), "--digits_fid", "--num_images", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --digits_fid needs at least 4 samples") and err.count("\n") == 1


LOCK_HOLDER = """
import sys
from ddpm_hub.output_lock import OutputLock
with OutputLock(sys.argv[1], "sample"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_sample_out_dir_is_refused_at_once_while_another_run_holds_the_folder(trained, tmp_path, capsys, monkeypatch):
    from ddpm_hub import cli

    out_dir = tmp_path / "samples"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    loaded, real = [], cli.load_pipeline
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loaded.append(a) or real(*a, **k))
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["sample", "--model", str(trained), "--num_images", "2", "--steps", "2", "--out_dir", str(out_dir)])
        err = capsys.readouterr().err
    finally:
        holder.stdin.close()  # the holder releases the lock and returns
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    assert code == 2 and err.startswith("error: --out_dir") and err.count("\n") == 1, err
    assert f"PID {holder.pid} (sample)" in err
    assert not loaded  # refused before the model is loaded, let alone sampled
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: the holder's folder left with it


def _partial_then_disk_full(fp) -> None:
    """Write the first bytes of a file, as a full disk would leave them, then fail as a full disk does."""
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG partial")
    else:
        fp.write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["png", "npz", "grid"])
def test_sample_disk_full_leaves_no_partial_file_and_names_the_path(trained, tmp_path, capsys, monkeypatch, failing):
    import numpy as np

    out_dir, grid = tmp_path / "samples", tmp_path / "grid.png"
    argv = ["sample", "--model", str(trained), "--num_images", "4", "--steps", "2"]
    argv += ["--out", str(grid)] if failing == "grid" else ["--out_dir", str(out_dir)]
    if failing == "npz":
        monkeypatch.setattr(np, "savez_compressed", lambda fp, *a, **k: _partial_then_disk_full(fp))
        target = out_dir / "samples.npz"
    else:  # the third PNG, or the grid (the only image a run without --out_dir saves)
        calls, save = [], Image.Image.save

        def failing_save(self, fp, *args, **kwargs):
            calls.append(fp)
            if len(calls) == (3 if failing == "png" else 1):
                _partial_then_disk_full(fp)
            return save(self, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", failing_save)
        target = out_dir / "000002.png" if failing == "png" else grid
    assert main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no PNG, samples.npz, staging, lock file or folder
    err = capsys.readouterr().err  # after the progress bars of loading and sampling: the error, on one line
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and str(target) in last and "No space left" in last and "Traceback" not in err


def test_sample_never_writes_through_a_link_planted_at_a_target(trained, tmp_path, monkeypatch):
    import numpy as np

    from ddpm_hub import sampling

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out_dir, grid = tmp_path / "samples", tmp_path / "grid.png"
    grid.symlink_to(victim)
    real = sampling.sample_uint8

    def plant_then_sample(*args, **kwargs):  # while the run samples: after its check that the folder holds none
        for name in ("000000.png", "samples.npz"):
            (out_dir / name).symlink_to(victim)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_uint8", plant_then_sample)
    assert main(["sample", "--model", str(trained), "--num_images", "2", "--steps", "2", "--upscale", "1",
                 "--out_dir", str(out_dir), "--out", str(grid)]) == 0  # fmt: skip
    assert victim.read_bytes() == b"precious"
    for path in (out_dir / "000000.png", out_dir / "samples.npz", grid):
        assert not path.is_symlink(), path  # the link itself was replaced by the file
    arrays = np.load(out_dir / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(np.asarray(Image.open(out_dir / "000000.png")), arrays[0, ..., 0])
    assert Image.open(grid).size == (16, 8)


def test_a_path_too_long_for_the_system_is_one_line_naming_its_option(tmp_path, capsys):
    from ddpm_hub.cli import main as cli_main

    long = "a" * 5000
    for argv, option in ((["sample", "--model", f"./{long}", "--num_images", "1"], "--model"),
                         (["push", "--folder", long, "--repo_id", "o/x"], "--folder"),
                         (["sample", "--model", f"./{long}", "--out", f"{long}.png"], "--model")):  # fmt: skip
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {option} ") and "not a usable path" in err, err
        assert len(err) < 400


def test_samplers_with_chatty_libraries_sample_quietly(trained, tmp_path):
    """`sample` prints its one line only: DPM-Solver singlestep is built as diffusers would switch it anyway (no
    warning at each call), torchsde's float-rounding warnings of DPM-SDE are not shown."""
    from conftest import subprocess_env

    for sampler in ("dpm_singlestep", "dpm_sde"):
        out = tmp_path / f"{sampler}.png"
        proc = subprocess.run([sys.executable, "-m", "ddpm_hub", "sample", "--model", str(trained), "--sampler",
                               sampler, "--num_images", "2", "--steps", "6", "--out", str(out)],
                              capture_output=True, text=True, env=subprocess_env(tmp_path, 1), timeout=300)  # fmt: skip
        assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
        noise = [line for line in proc.stderr.replace("\r", "\n").splitlines()  # progress bars aside
                 if line.strip() and "Loading pipeline components" not in line and "%|" not in line]  # fmt: skip
        assert noise == [], (sampler, noise)


def test_an_upscale_that_would_make_a_giant_picture_is_refused_before_sampling(trained, tmp_path, capsys, monkeypatch):
    """`--upscale` is bounded by the picture it makes (at most 2**28 pixels, PIL's own bomb limit): refused in one
    line before any sampling or editing, naming the size, with the way out (--out_dir keeps the images at their
    size)."""
    import numpy as np

    import ddpm_hub.sampling

    monkeypatch.setattr(ddpm_hub.sampling, "sample_uint8", lambda *a, **k: pytest.fail("sampled before the check"))
    line = one_line_error(["sample", "--model", str(trained), "--num_images", "4", "--upscale", "100000",
                           "--out", str(tmp_path / "big.png")], capsys)  # fmt: skip
    assert line.startswith("error: --upscale 100000 makes a picture of about") and "--out_dir" in line
    assert not (tmp_path / "big.png").exists()
    # the editing commands too, before any editing
    monkeypatch.setattr("ddpm_hub.cli._run_editor", lambda *a, **k: pytest.fail("edited before the check"))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "digit.png")
    line = one_line_error(["img2img", "--model", str(trained), "--image", str(tmp_path / "digit.png"), "--upscale",
                           "100000", "--out", str(tmp_path / "big.png")], capsys)  # fmt: skip
    assert line.startswith("error: --upscale 100000 makes a picture of about") and "from 5 tile(s) of 8 px" in line
