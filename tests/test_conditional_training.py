"""Class-conditional training: labels and class names from the data (matched by name across splits), labels that
follow their images, label dropout, options refused where they would be ignored, exact resume, 2 ranks, fine-tuning
by class name, and the trained model's folder, card and metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST_ARGS, read_metrics, run_train, subprocess_env, train_in_process
from PIL import Image

from ddpm_hub import DDPMPipeline
from ddpm_hub.config import DataConfig
from ddpm_hub.data import DataError, class_names, encode_labels, load_digits_dataset, load_splits

NUM_CLASSES = 3  # of the synthetic data of _synthetic_trainer


# -- Labels from the data ----------------------------------------------------------------------------------------------


def _png(folder, name, value):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(folder / name)


def test_labels_and_class_names_come_from_the_data(tmp_path):
    digits = load_digits_dataset()["train"]
    assert class_names(digits, "label") == [str(i) for i in range(10)]
    assert encode_labels(digits, "label", class_names(digits, "label")).tolist() == digits["label"]
    # an imagefolder with one subfolder per class: datasets' `label` ClassLabel, in train/ and test/
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for k, kind in enumerate(("cat", "dog")):
            for i in range(2):
                _png(root / split / kind, f"{i}.png", 50 * k + i)
    train, held = load_splits(DataConfig(train_data_dir=str(root), cache_dir=str(tmp_path / "cache")))
    names = class_names(train, "label")
    assert names == ["cat", "dog"]
    for split in (train, held):
        labels = encode_labels(split, "label", names)
        paths = [row["image"]["path"] for row in split]
        assert [names[i] for i in labels] == [p.split("/")[-2] for p in paths]  # the label of each file's folder
    # a Hub-style dataset with a string label column (--class_column): sorted distinct values are the classes
    dd = load_digits_dataset()
    layout = tmp_path / "hub-layout" / "data"
    layout.mkdir(parents=True)
    words = ["even", "odd"]
    for split, n in (("train", 30), ("test", 6)):
        ds = dd[split].select(range(n))
        ds = ds.add_column("parity", [words[v % 2] for v in ds["label"]])
        ds.to_parquet(str(layout / f"{split}-00000-of-00001.parquet"))
    train, held = load_splits(DataConfig(dataset_name=str(tmp_path / "hub-layout"), cache_dir=str(tmp_path / "c2")))
    assert class_names(train, "parity") == ["even", "odd"]
    assert encode_labels(held, "parity", ["even", "odd"]).tolist() == [v % 2 for v in held["label"]]
    # errors name the input: a missing column, a label outside the class list
    with pytest.raises(DataError, match="--class_column 'kind' not found in the train split") as exc:
        class_names(train, "kind")
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="held-out row 0 has the class 'even', which is not one of the 1 training"):
        encode_labels(held, "parity", ["odd"], "held-out")
    flat = tmp_path / "flat"
    _png(flat, "a.png", 1)
    _png(flat, "b.png", 2)
    train, _ = load_splits(DataConfig(train_data_dir=str(flat), cache_dir=str(tmp_path / "c3")))
    with pytest.raises(DataError, match="class subfolders, FOLDER/CLASS/IMAGE, not at its top level"):
        class_names(train, "label")


def test_held_out_labels_are_matched_to_the_training_classes_by_name(tmp_path, caplog):
    """A held-out folder's own ClassLabel ids differ from the training folder's when its classes differ: labels are
    matched by name; a class without training images is never a model class, and held-out images of it are a
    one-line error; a column of images or a single class is refused."""
    train_root, held_root = tmp_path / "train", tmp_path / "held"
    for k, kind in enumerate(("cat", "dog", "fox")):
        _png(train_root / kind, "0.png", 10 + k)
        _png(train_root / kind, "1.png", 10 + k)
    for kind in ("dog", "fox"):  # held-out ClassLabel: dog = 0, fox = 1; the training classes: dog = 1, fox = 2
        _png(held_root / kind, "0.png", 0)
    train, held = load_splits(DataConfig(train_data_dir=str(train_root), validation_data_dir=str(held_root),
                                         cache_dir=str(tmp_path / "c1")))  # fmt: skip
    names = class_names(train, "label")
    assert names == ["cat", "dog", "fox"]
    labels = encode_labels(held, "label", names, "held-out")
    assert [names[i] for i in labels] == [row["image"]["path"].split("/")[-2] for row in held]
    assert sorted(labels.tolist()) == [1, 2]
    one = tmp_path / "one"  # a held-out folder of a single class keeps its label (datasets drops a lone one)
    _png(one / "fox", "0.png", 0)
    _, held = load_splits(DataConfig(train_data_dir=str(train_root), validation_data_dir=str(one),
                                     cache_dir=str(tmp_path / "c0")))  # fmt: skip
    assert encode_labels(held, "label", names, "held-out").tolist() == [2]
    # a held-out class the model never saw: refused by name, in one line
    _png(held_root / "owl", "0.png", 0)
    _, held = load_splits(DataConfig(train_data_dir=str(train_root), validation_data_dir=str(held_root),
                                     cache_dir=str(tmp_path / "c2")))  # fmt: skip
    with pytest.raises(DataError, match="has the class 'owl', which is not one of the 3 training classes") as exc:
        encode_labels(held, "label", names, "held-out")
    assert "\n" not in str(exc.value)
    # a class only in test/ (the folder's ClassLabel is the union over splits) is not a model class
    root = tmp_path / "union"
    for kind in ("cat", "dog"):
        _png(root / "train" / kind, "0.png", 1)
    for kind in ("cat", "dog", "owl"):
        _png(root / "test" / kind, "0.png", 1)
    train, held = load_splits(DataConfig(train_data_dir=str(root), cache_dir=str(tmp_path / "c3")))
    with caplog.at_level("WARNING"):
        names = class_names(train, "label")
    assert names == ["cat", "dog"] and "['owl'] have no image in the train split" in caplog.text
    with pytest.raises(DataError, match="class 'owl', which is not one of the 2 training classes"):
        encode_labels(held, "label", names, "held-out")
    # a column that holds no labels, and a single class
    with pytest.raises(DataError, match="--class_column 'image' of the train split holds Image values, not class "
                       "labels.*label columns: \\['label'\\]"):  # fmt: skip
        class_names(load_digits_dataset()["train"], "image")
    one = load_digits_dataset()["train"].filter(lambda row: row["label"] == 3)
    with pytest.raises(DataError, match="has 1 class\\(es\\) \\['3'\\]: a class-conditional model needs at least 2"):
        class_names(one, "label")


def test_the_card_names_a_validation_folder_as_the_metrics_split(tmp_path):
    """Metrics measured on --validation_data_dir are of that folder, not of the training data's train split."""
    import contextlib
    import types

    from ddpm_hub.training.training_data import prepare_data

    from ddpm_hub.config import parse_args

    for k, kind in enumerate(("cat", "dog")):
        _png(tmp_path / "train" / kind, "0.png", 10 + k)
        _png(tmp_path / "train" / kind, "1.png", 20 + k)
        _png(tmp_path / "held-out images" / kind, "0.png", 30 + k)
    cfg = parse_args(["--train_data_dir", str(tmp_path / "train"), "--validation_data_dir",
                         str(tmp_path / "held-out images"), "--resolution", "8", "--output_dir", str(tmp_path / "o"),
                         "--train_batch_size", "2", "--max_train_steps", "1", "--cache_dir", str(tmp_path / "c")])
    accelerator = types.SimpleNamespace(main_process_first=contextlib.nullcontext, is_local_main_process=False,
                                        num_processes=1)  # fmt: skip
    data = prepare_data(cfg, accelerator)
    assert len(data.held_out) == 2 and data.eval_split == "validation folder held-out images"


def _synthetic_trainer(tmp_path, cond_drop_prob: float = 0.1, **options):
    """A Trainer on 60 images whose pixels encode their label (value 20 * label): pairing is checkable."""
    from ddpm_hub.training.trainer import Trainer
    from ddpm_hub.training.training_data import Data

    from ddpm_hub.config import build_config

    labels = torch.arange(60) % NUM_CLASSES
    images = (labels * 20).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    data = Data(torch.utils.data.TensorDataset(images, labels), None, 60, 0, 1, "synthetic", None, None,
                ["a", "b", "c"])  # fmt: skip
    cfg = build_config({"unet_preset": "tiny", "logger": "none", "output_dir": str(tmp_path / "run"),
                        "train_batch_size": 8, "max_train_steps": 100, "class_conditional": True,
                        "cond_drop_prob": cond_drop_prob, "num_eval_images": 0, **options})  # fmt: skip
    return Trainer(cfg, data=data)


def test_labels_follow_images_through_shuffling_and_epochs(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from ddpm_hub import output_lock

    try:
        trainer = _synthetic_trainer(tmp_path)
        assert trainer.unet.config.num_class_embeds == NUM_CLASSES + 1  # the last row is the null label
        batches = trainer.batches()
        seen = []
        for _ in range(3 * trainer.updates_per_epoch):  # across epoch boundaries
            images, labels = next(batches)
            assert torch.equal(images[:, 0, 0, 0].long(), labels * 20)
            seen.append(labels)
        assert not torch.equal(torch.cat(seen[:7]), torch.arange(56) % NUM_CLASSES)  # shuffled
        # label dropout: the null label (id num_classes) with probability cond_drop_prob, from the step's generator
        g = torch.Generator().manual_seed(0)
        dropped = trainer.drop_labels(torch.zeros(20_000, dtype=torch.long), g)
        assert set(dropped.unique().tolist()) == {0, NUM_CLASSES}
        assert abs(float((dropped == NUM_CLASSES).float().mean()) - 0.1) < 0.01
        trainer.cfg.diffusion.cond_drop_prob = 0.0
        assert (trainer.drop_labels(torch.ones(1000, dtype=torch.long), g) == 1).all()
    finally:
        output_lock.release(tmp_path / "run")  # the Trainer took the folder's lock; train() would release it
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# -- Options -----------------------------------------------------------------------------------------------------------


def test_trainer_refuses_conditional_options_it_would_ignore(tmp_path):
    """Every class-conditional option given where it cannot act, and every non-finite scale, is refused before any
    work, in one line."""
    from ddpm_hub.config import ConfigError, parse_args

    out = ["--output_dir", str(tmp_path / "out")]
    cases = [
        (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
        (["--class_conditional", "--guidance_scale", "inf"], "--guidance_scale must be a finite number"),
        (["--class_conditional", "--guidance_scale", "0"], "--guidance_scale must be > 0"),
        (["--cond_drop_prob", "0.2"], "--cond_drop_prob is for class-conditional training: add --class_conditional"),
        (["--class_column", "kind"], "--class_column is for class-conditional training"),
        (["--guidance_scale", "3"], "--guidance_scale is for class-conditional training"),
        (["--class_conditional", "--cond_drop_prob", "0", "--guidance_scale", "3"], "--cond_drop_prob 0 trains none"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ]
    for argv, needle in cases:
        with pytest.raises(ConfigError, match=needle) as exc:
            parse_args([*argv, *out])
        assert "\n" not in str(exc.value), argv
    assert not (tmp_path / "out").exists()


def test_a_config_file_that_sets_conditional_options_without_class_conditional_is_refused(tmp_path):
    """A hand-written config file naming a conditional option (even at its default) without `class_conditional` is
    refused like the flag; a run's saved config, which lists every option with class_conditional among them, is
    accepted as it is."""
    from ddpm_hub.config import ConfigError, TrainConfig, parse_args

    out = ["--output_dir", str(tmp_path / "out")]
    for text, needle in (("cond_drop_prob: 0.1\n", "--cond_drop_prob is for class-conditional training"),
                         ("data:\n  class_column: label\n", "--class_column is for class-conditional training"),
                         ('{"guidance_scale": 2.0}', "--guidance_scale is for class-conditional training")):
        path = tmp_path / ("c.json" if text.startswith("{") else "c.yaml")
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            parse_args(["--config", str(path), *out])
    dump = TrainConfig().to_dict()  # every option, class_conditional false and the conditional defaults
    assert dump["class_conditional"] is False and dump["cond_drop_prob"] == 0.1
    dump["output_dir"] = str(tmp_path / "out")
    (tmp_path / "dump.json").write_text(json.dumps(dump))
    config = parse_args(["--config", str(tmp_path / "dump.json")])
    assert config.class_conditional is False
    (tmp_path / "cond.yaml").write_text("class_conditional: true\ncond_drop_prob: 0.2\n")
    assert parse_args(["--config", str(tmp_path / "cond.yaml"), *out]).cond_drop_prob == 0.2


def test_a_run_refused_by_its_data_leaves_no_folder_behind(tmp_path, capsys):
    """Data validation runs after the output folder is locked: a refused run removes the folder it made (and an
    existing folder, empty or not, keeps no lock file), so a failed start leaves nothing to clean up."""
    from ddpm_hub.training.train import main

    from ddpm_hub.output_lock import LOCK_NAME

    fresh, existing, busy = tmp_path / "fresh", tmp_path / "existing", tmp_path / "busy"
    existing.mkdir()
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")  # a folder holding the user's files: they stay, the lock file goes
    for out in (fresh, existing, busy):
        argv = [*FAST_ARGS, "--class_conditional", "--class_column", "image", "--max_train_steps", "1",
                "--output_dir", str(out)]  # fmt: skip
        try:
            assert main(argv) == 2
        finally:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        assert "holds Image values, not class labels" in capsys.readouterr().err
    assert not fresh.exists()
    assert existing.is_dir() and not (existing / LOCK_NAME).exists()
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_fine_tuning_follows_the_pretrained_class_ids_by_name(tmp_path):
    from ddpm_hub.config import ConfigError
    from ddpm_hub.labels import pretrained_class_order, stored_class_names

    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"id2label": {"0": "zeta", "1": "alpha", "2": "mid"}}))
    assert stored_class_names(folder) == ["zeta", "alpha", "mid"]
    assert pretrained_class_order(str(folder), ["alpha", "mid", "zeta"]) == ["zeta", "alpha", "mid"]
    with pytest.raises(ConfigError, match=r"new: \['ant'\], missing: \['zeta'\]\): fine-tune on data with the same"):
        pretrained_class_order(str(folder), ["alpha", "ant", "mid"])
    assert pretrained_class_order(str(tmp_path), ["b", "a"]) == ["b", "a"]  # nothing stored: the data's order


# -- Training runs and resumes -----------------------------------------------------------------------------------------


def test_a_conditional_checkpoint_resumes_only_as_a_conditional_run(trained_conditional, tmp_path):
    """--class_conditional and --class_column cannot change on resume: a one-line error before any loading."""
    from ddpm_hub.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(trained_conditional / "checkpoints", run / "checkpoints")
    args = [*FAST_ARGS, "--output_dir", str(run), "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
            "--variance_type", "learned_range", "--num_eval_images", "20", "--num_inference_steps", "4",
            "--final_bpd", "estimate", "--eval_bpd_samples", "4", "--num_quality_samples", "40",
            "--checkpointing_steps", "3"]  # fmt: skip
    with pytest.raises(ConfigError, match="--class_conditional is False here and was True") as exc:
        train_in_process(args)
    assert "\n" not in str(exc.value)


def test_conditional_exact_resume_with_accumulation_matches_uninterrupted_run(tmp_path):
    common = [*FAST_ARGS, "--class_conditional", "--variance_type", "learned_range", "--max_train_steps", "10",
              "--checkpointing_steps", "4", "--lr_warmup_steps", "3", "--gradient_accumulation_steps", "2",
              "--checkpoints_total_limit", "5"]  # fmt: skip
    full = tmp_path / "full"
    proc = run_train([*common, "--output_dir", str(full)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    proc = run_train([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [h["loss"] for h in read_metrics(full)["history"] if h["step"] > 4]
    b = [h["loss"] for h in read_metrics(resumed)["history"] if h["step"] > 4]
    assert len(b) == 6 and a == b  # bit-identical losses: labels and their dropout resume exactly
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refusals_name_the_runs_value_and_older_checkpoints_resume(tmp_path):
    """A fixed option that differs is refused with the run's value to resume with; label dropout is fixed (the
    card's guidance depends on it); an option a checkpoint predates counts as its default there."""
    from ddpm_hub.config import TrainConfig
    from ddpm_hub.resuming import ResumeOptionError, check_resumed_options

    saved = dict(TrainConfig().to_dict(), class_conditional=True)
    for name, now, flag in (("class_conditional", False, "--class_conditional True"),
                            ("cond_drop_prob", 0.0, "--cond_drop_prob 0.1")):
        current = dict(saved, **{name: now})
        with pytest.raises(ResumeOptionError, match=f"resume with the run's value \\({flag}\\)"):
            check_resumed_options(saved, current, "ckpt")
    old = {k: v for k, v in TrainConfig().to_dict().items()
           if k not in ("class_conditional", "class_column", "cond_drop_prob", "guidance_scale")}
    check_resumed_options(old, TrainConfig().to_dict(), "ckpt")  # predates the conditional options: resumes
    with pytest.raises(ResumeOptionError, match="--class_conditional is True here and was False"):
        check_resumed_options(old, saved, "ckpt")


@pytest.mark.slow
def test_two_rank_conditional_run(tmp_path):
    out = tmp_path / "ddp"
    args = [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "4", "--class_conditional"]
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    proc = run_train(args, tmp_path, launcher=launcher, threads=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(out)
    assert metrics["num_processes"] == 2 and metrics["ranks_identical"] is True


def test_trained_conditional_model_folder_card_and_metrics(trained_conditional, tmp_path):
    out = trained_conditional
    index = json.loads((out / "model_index.json").read_text())
    assert index["id2label"] == {str(i): str(i) for i in range(10)} and index["cond_drop_prob"] == 0.1
    checkpoint = DDPMPipeline.from_pretrained(out / "checkpoints" / "checkpoint-3")  # keeps the class names too
    assert checkpoint.id2label == {i: str(i) for i in range(10)} and checkpoint.config.cond_drop_prob == 0.1
    assert (out / "pipeline.py").read_text().startswith('"""Class labels and classifier-free guidance')
    metrics = read_metrics(out)["metrics"]
    for key in ("held_out_bits_per_dim_estimate", "held_out_unconditional_bits_per_dim_estimate",
                "digits_conv_fid", "digits_mlp_fid", "digits_class_accuracy"):  # fmt: skip
        assert np.isfinite(metrics[key]), key
    grid = Image.open(out / "samples.png")  # one row per class: 10 rows of ceil(20 / 10) = 2 tiles of 64 px
    assert grid.size == (2 * 66 + 2, 10 * 66 + 2)
    card = (out / "README.md").read_text()
    assert "## Classes" in card and "0: `0`" in card and "9: `9`" in card and "Recommended: **2.0**" in card
    assert "held_out_unconditional_bits_per_dim_estimate" in card and "digits_class_accuracy" in card
    assert "ask for the held-out images' labels in turn (the held-out class mix), at guidance scale 2.0." in card
    assert "pipeline_tag: image-generation" in card and "{{" not in card and "{%" not in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'custom_pipeline="pipeline", trust_remote_code=True' in snippet
    script = 'import sys; sys.modules["ddpm_hub"] = None\n' + snippet + "\nassert len(images) == 2, images\n"
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(tmp_path), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
