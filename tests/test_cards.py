"""Model cards: on every push route the card parses with huggingface_hub (typed metrics, standard errors as a
property of their metric, the data named by an id-like type and a human name), its usage snippet loads the pushed
repo as written, the picture it shows is uploaded with it, and it states only what is true."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FAKE_TOKEN, FAST_ARGS, card_snippet, random_unet, run_snippets, run_train, subprocess_env
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from ddpm_hub import DDPMPipeline, DDPMScheduler
from ddpm_hub.choices import SAMPLERS
from ddpm_hub.cli import main as cli
from ddpm_hub.hub import EMBEDDED_DIGITS, render_model_card


@pytest.fixture(scope="module")
def run_with_metrics(tmp_path_factory):
    """A 2-step digits run with a held-out estimate at the end and in its checkpoint, and a sample grid."""
    tmp = tmp_path_factory.mktemp("cards")
    out = tmp / "run"
    args = [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--eval_steps", "2", "--eval_bpd_samples", "2", "--final_bpd", "estimate", "--num_eval_images", "4",
            "--num_inference_steps", "5"]  # fmt: skip
    proc = run_train(args, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def check_pushed_card(hub, repo: str, metrics: dict[str, float]) -> str:
    """The pushed card names `repo`, parses with `ModelCard.load`, types its metrics and shows only files it has."""
    files = hub.state.repos[repo].head[1]
    card_text = files["README.md"].decode()
    assert f'DDPMPipeline.from_pretrained("{repo}")' in card_text, repo
    assert ("![samples](samples.png)" in card_text) == ("samples.png" in files), repo
    card = ModelCard.load(repo, token=FAKE_TOKEN)  # through the real client
    assert card.data.license == "cc-by-4.0" and "not recorded" not in card.text, repo
    assert "datasets" not in card.data.to_dict(), repo  # the embedded digits have no Hub id
    results = {(r.metric_type, r.metric_config): r for r in card.data.eval_results}
    estimate = results[("bits_per_dim", "estimate")]
    assert estimate.metric_value == round(metrics["held_out_bits_per_dim_estimate"], 4), repo
    assert estimate.metric_args == {"standard_error": round(metrics["held_out_bits_per_dim_stderr"], 4)}, repo
    assert (estimate.dataset_type, estimate.dataset_name) == (EMBEDDED_DIGITS["type"], EMBEDDED_DIGITS["name"])
    assert estimate.dataset_split == "test"
    assert not any("stderr" in r.metric_type or "stderr" in (r.metric_name or "") for r in card.data.eval_results)
    return card_text


def test_every_push_route_uploads_a_card_that_parses_and_loads_the_repo(hub, run_with_metrics, tmp_path, monkeypatch):
    hub.state.token = FAKE_TOKEN
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run = run_with_metrics
    checkpoint = run / "checkpoints" / "checkpoint-2"
    pipeline = DDPMPipeline.from_pretrained(run)
    pipeline.push_to_hub("bare-push", token=FAKE_TOKEN)  # a bare name: the user's namespace, from whoami
    pipeline.save_pretrained(tmp_path / "named-after-folder", push_to_hub=True, token=FAKE_TOKEN)  # as diffusers
    pipeline.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="org/via-save", token=FAKE_TOKEN)
    assert cli(["push", "--folder", str(run), "--repo_id", "org/via-cli"]) == 0
    assert cli(["push", "--folder", str(checkpoint), "--repo_id", "org/via-checkpoint"]) == 0

    final = json.loads((run / "metrics.json").read_text())["metrics"]
    record = json.loads((checkpoint / "training_run.json").read_text())
    expected = {"tester/bare-push": final, "tester/named-after-folder": final, "org/via-save": final,
                "org/via-cli": final, "org/via-checkpoint": record["ema_metrics"]}  # fmt: skip
    assert set(record["ema_metrics"]) == {"held_out_bits_per_dim_estimate", "held_out_bits_per_dim_stderr"}
    snippets = {repo: card_snippet(check_pushed_card(hub, repo, metrics)) for repo, metrics in expected.items()}
    for repo in ("tester/bare-push", "tester/named-after-folder", "org/via-save", "org/via-cli"):
        assert hub.state.repos[repo].head[1]["samples.png"] == (run / "samples.png").read_bytes(), repo
    assert f'from_pretrained("{run}")' in (run / "README.md").read_text()  # the local card is left as it was
    run_snippets(snippets, tmp_path)


def test_card_metadata_is_typed_and_round_trips_through_huggingface_hub():
    metrics = {"held_out_bits_per_dim": 4.41, "held_out_bits_per_dim_estimate": 4.4, "held_out_bits_per_dim_stderr":
               0.0123, "digits_mlp_fid": 1.5, "digits_conv_fid": 2.5, "digits_conv_fid_ci95": 0.3,
               "digits_mlp_kid": 0.01, "fid": 20.0}  # fmt: skip
    card = render_model_card(hparams={"resolution": 32}, metrics=metrics, repo_id="org/m", num_parameters=1,
                             channels=3, dataset_id="uoft-cs/cifar10", dataset_description="CIFAR-10",
                             eval_split="test")  # fmt: skip
    parsed = ModelCard(str(card))
    assert parsed.data.datasets == ["uoft-cs/cifar10"]  # a Hub id: in `datasets` and as the model-index type
    by_type = {(r.metric_type, r.metric_config, r.metric_value) for r in parsed.data.eval_results}
    assert by_type == {("bits_per_dim", None, 4.41), ("bits_per_dim", "estimate", 4.4), ("fid", "inception-v3", 20.0),
                       ("fid", "ddpm-hub-digits-mlp", 1.5), ("fid", "ddpm-hub-digits-conv", 2.5),
                       ("kid", "ddpm-hub-digits-mlp", 0.01)}  # fmt: skip
    assert len(parsed.data.eval_results) == 6  # a standard error or a seed interval is no metric of its own
    expected_args = {"estimate": {"standard_error": 0.0123},
                     "ddpm-hub-digits-conv": {"ci95_half_width_over_seeds": 0.3}}
    for result in parsed.data.eval_results:
        assert (result.dataset_type, result.dataset_name, result.dataset_split) == ("uoft-cs/cifar10",) * 2 + ("test",)
        assert result.metric_args == expected_args.get(result.metric_config)
    # the YAML is what huggingface_hub's own model-index reader returns, field for field
    name, again = model_index_to_eval_results(parsed.data.to_dict()["model-index"])
    assert name == "org/m" and again == parsed.data.eval_results
    assert "4.4000 ± 0.0123" in parsed.text  # the table shows the standard error with its value


def test_the_trainer_resolves_a_bare_hub_model_id_before_training(hub):
    from types import SimpleNamespace

    from ddpm_hub.training.trainer import Trainer

    from ddpm_hub.config import parse_args

    hub.state.token = FAKE_TOKEN
    cfg = parse_args(["--push_to_hub", "--hub_model_id", "my-ddpm"])
    run = SimpleNamespace(cfg=cfg, hub_token=FAKE_TOKEN)  # what `_check_hub` reads of the trainer
    Trainer._check_hub(run)
    assert run.cfg.hub_model_id == "tester/my-ddpm" and "tester/my-ddpm" in hub.state.repos


def test_the_card_says_how_long_the_run_trained_and_each_metric_row_stands_alone():
    """A 30-step run and a 3,000-step run must not read alike; a row must not point at a row the card lacks."""
    metrics = {"held_out_bits_per_dim_estimate": 8.26, "held_out_bits_per_dim_stderr": 0.09}
    hparams = {"preset": "digits", "unet_preset": "tiny", "resolution": 8, "max_train_steps": 30, "num_epochs": 5}
    text = str(render_model_card(hparams=hparams, metrics=metrics, repo_id="org/m", num_parameters=1, channels=1,
                                 dataset_id=None, dataset_description="digits"))  # fmt: skip
    assert "| max_train_steps | 30 |" in text and "| unet_preset | tiny |" in text
    assert "num_epochs" not in text  # the step count won; the epochs were not what the run did
    by_epochs = {**hparams, "max_train_steps": None}
    text_epochs = str(render_model_card(hparams=by_epochs, metrics=metrics, repo_id="org/m", num_parameters=1,
                                        channels=1, dataset_id=None, dataset_description="digits"))  # fmt: skip
    assert "| num_epochs | 5 |" in text_epochs and "max_train_steps" not in text_epochs
    row = next(line for line in text.splitlines() if line.startswith("| held_out_bits_per_dim_estimate"))
    assert "same" not in row and "held-out" in row, row  # no reference to a full-bound row that is absent


def test_every_push_route_of_a_conditional_model_uploads_a_card_naming_the_repo(hub, tmp_path, monkeypatch):
    """A class-conditional folder's card (stock diffusers through the repo's pipeline.py) names the pushed repo in
    its usage snippet, its title and its model-index name on every push route, never the local folder."""
    hub.state.token = FAKE_TOKEN
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run = tmp_path / "cond"
    args = [*FAST_ARGS, "--output_dir", str(run), "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--class_conditional", "--num_eval_images", "10", "--num_inference_steps", "2"]  # fmt: skip
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'from_pretrained("{run}", custom_pipeline="pipeline"' in (run / "README.md").read_text()
    pipeline = DDPMPipeline.from_pretrained(run)
    pipeline.push_to_hub("cond-bare", token=FAKE_TOKEN)
    pipeline.save_pretrained(tmp_path / "cond-named-after-folder", push_to_hub=True, token=FAKE_TOKEN)
    pipeline.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="org/cond-via-save", token=FAKE_TOKEN)
    assert cli(["push", "--folder", str(run), "--repo_id", "org/cond-via-cli"]) == 0
    assert cli(["push", "--folder", str(run / "checkpoints" / "checkpoint-2"), "--repo_id", "org/cond-ckpt"]) == 0
    for repo in ("tester/cond-bare", "tester/cond-named-after-folder", "org/cond-via-save", "org/cond-via-cli",
                 "org/cond-ckpt"):  # fmt: skip
        files = hub.state.repos[repo].head[1]
        text = files["README.md"].decode()
        assert f'DiffusionPipeline.from_pretrained("{repo}", custom_pipeline="pipeline"' in text, (repo, text)
        assert str(run) not in text and str(tmp_path) not in text, repo
        assert "pipeline.py" in files, repo
        card = ModelCard.load(repo, token=FAKE_TOKEN)
        suffix = " (EMA weights)" if repo == "org/cond-ckpt" else ""  # a checkpoint's card says what it holds
        assert card.text.lstrip().startswith(f"# {repo}{suffix}\n"), (repo, card.text[:200])
        assert card.data.model_name in (repo, repo + suffix), (repo, card.data.model_name)


def _card_snippet(folder, learned: bool, sampler: str | None) -> str:
    from ddpm_hub.hub import render_model_card

    card = str(render_model_card(
        hparams={"resolution": 8, "variance_type": "learned_range" if learned else "fixed_small"}, metrics={},
        repo_id=str(folder), num_parameters=1, channels=1, dataset_id=None, dataset_description="digits",
        num_inference_steps=SAMPLERS[sampler].steps if sampler else 1000, sampler=sampler,
    ))  # fmt: skip
    return card_snippet(card)


def _run_snippet(snippet: str, tmp_path, block_ddpm_hub: bool) -> subprocess.CompletedProcess:
    script = ('import sys; sys.modules["ddpm_hub"] = None\n' if block_ddpm_hub else "") + snippet
    script += "\nassert len(images) == 16 and images[0].size == (8, 8), images\n"
    return subprocess.run([sys.executable, "-c", script], env=subprocess_env(tmp_path), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned_range"])
@pytest.mark.parametrize("sampler", [None, "dpm", "ddim"])
def test_the_cards_usage_snippet_runs_as_written(tmp_path, learned, sampler):
    """The snippet runs verbatim; it needs ddpm_hub only where stock diffusers cannot do it (a learned variance
    with a sampler other than DDPM: diffusers' DPM-Solver keeps 3 of a 1-channel model's 2 output channels)."""
    variance = "learned_range" if learned else "fixed_small"
    folder = tmp_path / "model"
    DDPMPipeline(unet=random_unet(learned=learned),
                 scheduler=DDPMScheduler(variance_type=variance)).save_pretrained(folder)  # fmt: skip
    snippet = _card_snippet(folder, learned, sampler)
    needs_ours = learned and sampler is not None
    assert snippet.startswith("from ddpm_hub import DDPMPipeline") == needs_ours, snippet
    proc = _run_snippet(snippet, tmp_path, block_ddpm_hub=not needs_ours)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if needs_ours:  # the claim behind the choice: stock diffusers' pipeline fails with this sampler
        stock = snippet.replace("from ddpm_hub import DDPMPipeline", "from diffusers import DDPMPipeline")
        proc = _run_snippet(stock, tmp_path, block_ddpm_hub=True)
        assert proc.returncode != 0 and "channels" in proc.stderr, proc.stderr[-2000:]


def test_model_card_states_only_what_is_true(trained):
    card = (trained / "README.md").read_text()
    assert "license: cc-by-4.0" in card and "apache-2.0" in card  # the data's license, and the code's
    assert "https://github.com/)" not in card and "[ddpm-hub](https://github.com/)" not in card
    assert f'from_pretrained("{trained}")' in card  # a local path: it was not pushed
    assert "exponential moving average" in card
    from ddpm_hub.hub import render_model_card

    common = dict(hparams={"resolution": 8}, repo_id=None, num_parameters=10, channels=1, dataset_id=None,
                  dataset_description="the UCI optical digits (embedded)")  # fmt: skip
    text = str(render_model_card(metrics={"held_out_bits_per_dim": 4.5}, ema=False, **common))
    assert "model-index" in text and "name: the UCI optical digits (embedded)" in text and "4.5" in text
    assert "no EMA" in text and "exponential moving average" not in text
    assert "license: other" in text and "not recorded" in text  # unknown data license: said, not guessed
