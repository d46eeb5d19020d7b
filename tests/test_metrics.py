"""Sample-quality metrics against closed forms and float64 references: FID / IS through torchmetrics, offline, with a
small feature extractor made here; precision/recall, class-frequency error, classifier score and the two digits
feature spaces; the quality report over seeds; and sample quality during training: `--eval_fid_steps` logs FID/KID
to the trackers at the right steps from seeded samples, `--keep_best_checkpoint` keeps (and `--final_weights best`
exports) exactly the best checkpoint, resumes keep the best-so-far, and impossible combinations are one-line errors
before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_ARGS, RecordingTracker, run_train, train_in_process
from PIL import Image
from safetensors.torch import load_file
from scipy import linalg

from ddpm_hub import checkpoints as ckpt
from ddpm_hub import metrics
from ddpm_hub.config import ConfigError, parse_args
from ddpm_hub.metrics import frechet_inception_distance, inception_score


class MeanColour(torch.nn.Module):
    """A tiny deterministic 'feature extractor': per-channel means and variances of uint8 images."""

    num_features = 6  # torchmetrics reads this to size its statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.var(dim=(2, 3))], dim=1)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_closed_form_and_orders_distributions():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    close = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    far = torch.rand(64, 3, 8, 8, generator=g) * 0.3  # floats in [0, 1]: dark images
    extractor = MeanColour()
    fid_close = frechet_inception_distance([real[:32], real[32:]], [close], feature=extractor)
    fid_far = frechet_inception_distance([real], [far], feature=extractor)
    assert 0 <= fid_close < fid_far
    ref = _reference_fid(extractor(real).double().numpy(), extractor(close).double().numpy())
    assert fid_close == pytest.approx(ref, rel=1e-3, abs=1e-5)
    gray = real[:, :1]
    assert frechet_inception_distance([gray], [gray], feature=extractor) == pytest.approx(0.0, abs=1e-4)


class Logits(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.stack([x.mean(dim=(1, 2, 3)) * 10, -x.mean(dim=(1, 2, 3)) * 10, x.std(dim=(1, 2, 3))], 1)


def test_inception_score_code_path():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = inception_score([images[:20], images[20:]], feature=Logits(), splits=2)
    assert 1.0 <= mean <= 3.0 and std >= 0


# -- precision/recall, class-frequency error, classifier score, the two digits feature spaces --------------------------


def _reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 by brute force in float64 numpy: loops, no shared code with the torch version."""

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(points, centres, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r, strict=True)) for p in points])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force_float64(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(70, 4))
    fake = rng.normal(loc=0.8, scale=1.0, size=(55, 4))
    expected = _reference_precision_recall(real, fake, k)
    got = metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, chunk=16)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # a case that tells the two apart from the trivial answers


def test_precision_recall_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    assert metrics.precision_recall(x, x.clone()) == (1.0, 1.0)  # identical sets
    assert metrics.precision_recall(x, x + 1000.0) == (0.0, 0.0)  # disjoint, far apart
    # fakes collapsed onto one real point: every fake is real-looking (precision 1), diversity is gone (recall low)
    collapsed = x[:1].repeat(50, 1)
    precision, recall = metrics.precision_recall(x, collapsed)
    assert precision == 1.0 and recall <= 4 / 50
    with pytest.raises(ValueError, match="k must be"):
        metrics.precision_recall(x[:3], x[:3], k=3)


def test_class_frequency_error_is_total_variation_of_predicted_mix():
    def logits(labels):
        return torch.nn.functional.one_hot(torch.tensor(labels), 10).float() * 5

    assert metrics.class_frequency_error(logits([0, 1, 2, 3]), logits([3, 2, 1, 0])) == 0.0
    assert metrics.class_frequency_error(logits([0, 1]), logits([2, 3, 2])) == pytest.approx(1.0)
    # real mix (1/2, 1/2, 0), fake mix (1/4, 1/4, 1/2): TV = (1/4 + 1/4 + 1/2) / 2
    assert metrics.class_frequency_error(logits([0, 1]), logits([0, 1, 2, 2])) == pytest.approx(0.5)


def test_classifier_score_closed_form():
    confident = torch.eye(10).repeat(3, 1) * 50  # every class equally often, each sample certain
    assert metrics.classifier_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert metrics.classifier_score(torch.zeros(30, 10)) == pytest.approx(1.0)  # no information
    assert metrics.classifier_score(confident[:1].repeat(30, 1)) == pytest.approx(1.0)  # one class only


def test_frechet_and_kernel_distance_of_features_match_float64_references():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(120, 5)), rng.normal(loc=0.3, size=(120, 5))
    fid = metrics.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert fid == pytest.approx(_reference_fid(b, a), rel=1e-6)

    def k(x, y):
        return (x @ y.T / x.shape[1] + 1) ** 3

    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    unbiased = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    kid, std = metrics.kernel_distance(torch.from_numpy(a), torch.from_numpy(b))  # one subset size = all: exact
    assert kid == pytest.approx(unbiased, rel=1e-6) and std == pytest.approx(0.0, abs=1e-9)
    assert metrics.kernel_distance(torch.from_numpy(a), torch.from_numpy(b), 50, seed=1) == metrics.kernel_distance(
        torch.from_numpy(a), torch.from_numpy(b), 50, seed=1
    )  # seeded subsets: repeatable


def test_mean_interval_matches_scipy():
    from scipy import stats

    values = [2.26, 2.48, 4.12, 5.08]
    out = metrics.mean_interval(values)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert out["mean"] == pytest.approx(np.mean(values))
    assert out["half_width"] == pytest.approx((high - low) / 2)
    assert metrics.mean_interval([1.5])["half_width"] == 0.0


def test_shipped_digits_classifiers_accuracy_as_documented():
    from ddpm_hub.digits_features import SPACES, digits_arrays, held_out_accuracy, load_digits_classifier

    documented = {"digits_mlp": 294 / 300, "digits_conv": 296 / 300}  # module docstring and docs/benchmarks.md
    for space in SPACES:
        assert held_out_accuracy(load_digits_classifier(space)) == pytest.approx(documented[space], abs=1e-6)
    x, _ = digits_arrays("test")
    assert load_digits_classifier("digits_conv").features(x[:4]).shape == (4, 128)
    with pytest.raises(ValueError, match="digits_mlp, digits_conv"):
        load_digits_classifier("inception")


def test_digits_quality_in_every_space_orders_real_digits_above_noise():
    from ddpm_hub.digits_features import SPACES, digits_arrays

    train, _ = digits_arrays("train")
    test, _ = digits_arrays("test")
    same = metrics.digits_quality(test, test)
    digits = metrics.digits_quality(test, train[:300])
    noise_images = torch.randint(0, 256, (300, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise = metrics.digits_quality(test, noise_images)
    assert set(same) == {f"{s}_{m}" for s in SPACES for m in metrics.DIGITS_METRICS}
    for space in SPACES:
        assert same[f"{space}_fid"] == pytest.approx(0.0, abs=1e-6)
        assert same[f"{space}_precision"] == same[f"{space}_recall"] == 1.0
        assert same[f"{space}_class_error"] == 0.0
        for lower_is_better in ("fid", "kid", "class_error"):
            assert digits[f"{space}_{lower_is_better}"] < noise[f"{space}_{lower_is_better}"]
        for higher_is_better in ("precision", "recall", "classifier_score"):
            assert digits[f"{space}_{higher_is_better}"] > noise[f"{space}_{higher_is_better}"]


def test_sample_quality_report_pairs_seeds_and_summarises():
    from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
    from ddpm_hub.digits_features import digits_arrays

    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=create_unet("tiny"), scheduler=DDPMScheduler(num_train_timesteps=20))
    real, _ = digits_arrays("test")
    report = metrics.sample_quality_report(pipeline, real, ("digits_conv",), num_samples=12, num_inference_steps=3,
                                           seeds=(0, 1))  # fmt: skip
    again = metrics.sample_quality_report(pipeline, real, ("digits_conv",), num_samples=12, num_inference_steps=3,
                                          seeds=(1,))  # fmt: skip
    assert report["per_seed"][1] == again["per_seed"][0]  # a seed is the same noise whatever else is drawn
    assert report["per_seed"][0] != report["per_seed"][1]
    fids = [row["digits_conv_fid"] for row in report["per_seed"]]
    assert report["summary"]["digits_conv_fid"] == metrics.mean_interval(fids)
    assert (report["num_samples"], report["num_real"], report["seeds"]) == (12, 300, [0, 1])
    given = metrics.sample_quality_report(real[:40], real, ("digits_mlp",))
    assert given["num_samples"] == 40 and given["seeds"] == [] and len(given["per_seed"]) == 1


@pytest.mark.slow
def test_conv_classifier_training_regenerates_the_shipped_weights():
    from ddpm_hub.digits_features import (
        digits_arrays,
        held_out_accuracy,
        load_digits_classifier,
        train_digits_conv_classifier,
    )

    torch.set_num_threads(1)  # the shipped weights were written with one thread
    try:
        fresh = train_digits_conv_classifier()
    finally:
        torch.set_num_threads(2)
    shipped = load_digits_classifier("digits_conv")
    assert held_out_accuracy(fresh) == held_out_accuracy(shipped)
    x, _ = digits_arrays("test")
    with torch.no_grad():
        torch.testing.assert_close(fresh.features(x), shipped.features(x), rtol=1e-4, atol=1e-4)


def test_training_export_quality_states_space_samples_seeds_and_spread():
    """The trainer's final metric (evaluation.sample_quality) and the card row that describes each of its numbers."""
    from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
    from ddpm_hub.digits_features import SPACES, digits_arrays
    from ddpm_hub.evaluation import CARD_QUALITY_METRICS, sample_quality
    from ddpm_hub.hub import render_model_card

    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=create_unet("tiny"), scheduler=DDPMScheduler(num_train_timesteps=20))
    real, _ = digits_arrays("test")
    got = sample_quality(pipeline, real, num_samples=10, num_inference_steps=2, seed=4, batch_size=8, num_seeds=3)
    report = metrics.sample_quality_report(pipeline, real, num_samples=10, num_inference_steps=2, seeds=(4, 5, 6),
                                           batch_size=8)  # the same batches: the same noise
    expected = {f"{s}_{m}": report["summary"][f"{s}_{m}"]["mean"] for s in SPACES for m in CARD_QUALITY_METRICS}
    expected |= {f"{s}_{m}_ci95": report["summary"][f"{s}_{m}"]["half_width"] for s in SPACES for m in ("fid", "kid")}
    assert got == pytest.approx(expected)
    one_seed = sample_quality(pipeline, real, 10, 2, num_seeds=1)
    assert "digits_conv_fid_ci95" not in one_seed and "digits_conv_fid" in one_seed
    assert not [key for key in one_seed if "kid" in key]  # KID is quoted only with its interval

    hparams = {"resolution": 8, "num_quality_samples": 10, "num_quality_seeds": 3}
    card = str(render_model_card(hparams=hparams, metrics=got, repo_id=None, num_parameters=1, channels=1,
                                 dataset_id=None, dataset_description="digits", sampler="dpm",
                                 num_inference_steps=2))  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| digits_")}
    assert set(rows) == {key for key in got if not key.endswith("_ci95")}  # an interval shows with its FID
    for key, row in rows.items():
        assert ("CNN's 128-d" if key.startswith("digits_conv") else "MLP's 64-d") in row, row
        assert "mean over 3 seeds of 10 samples (dpm, 2 steps)" in row, row
    for space in SPACES:
        for metric in ("fid", "kid"):
            assert f"± {got[f'{space}_{metric}_ci95']:.4f} (95% interval over seeds)" in rows[f"{space}_{metric}"]


def test_trainer_exports_both_spaces_over_the_configured_seeds(tmp_path):
    from conftest import FAST_ARGS, train_in_process

    from ddpm_hub.digits_features import SPACES
    from ddpm_hub.evaluation import CARD_QUALITY_METRICS

    out = tmp_path / "run"
    result = train_in_process([*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "1", "--num_quality_samples",
                               "8", "--num_quality_seeds", "2", "--num_inference_steps", "2"])  # fmt: skip
    expected = {f"{s}_{m}" for s in SPACES for m in CARD_QUALITY_METRICS} | {f"{s}_fid_ci95" for s in SPACES}
    expected |= {f"{s}_kid_ci95" for s in SPACES}
    assert expected <= set(result["metrics"])
    card = (out / "README.md").read_text()
    assert "FID in the shipped digits CNN's 128-d features" in card
    assert "mean over 2 seeds of 8 samples (dpm, 2 steps)" in card


def test_without_torch_fidelity_the_final_quality_warning_names_the_trainers_remedy(monkeypatch, caplog):
    """RGB (non-digits) data without torch-fidelity: no FID/KID, and the warning says how to get them in terms of
    the trainer (pip install torch-fidelity, or --num_quality_samples 0), not a flag of another command."""
    import logging
    import sys

    from ddpm_hub.evaluation import sample_quality

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    held_out = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING):
        assert sample_quality(object(), held_out, num_samples=4, num_inference_steps=2) == {}
    assert "pip install torch-fidelity" in caplog.text and "--digits_fid" not in caplog.text, caplog.text


# -- sample quality during training (--eval_fid_steps, --keep_best_checkpoint) -----------------------------------------


EVAL = ["--eval_fid_steps", "2", "--eval_fid_samples", "20"]


SCRIPTED = {2: 5.0, 4: 3.0, 6: 4.0, 8: 6.0}  # step -> the selection metric the fake evaluation reports


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
