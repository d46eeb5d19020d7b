"""The Hub with the real huggingface_hub client against a local Hub server: push and load round trips (also
offline and with stock diffusers), retries of transient failures and at-once reports of the others, repo ids and
credentials checked before any work, and a token that never appears."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import (
    FAKE_TOKEN,
    FAST_ARGS,
    one_line_error,
    run_train,
    sample_images,
    subprocess_env,
    tiny_pipeline,
)
from hub_server import Fault
from huggingface_hub.errors import OfflineModeIsEnabled

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
from ddpm_hub.config import HUB_TOKEN_REFUSED
from ddpm_hub.hub_push import HubError, check_push_access, push_pipeline_folder, with_retries


def test_trainer_pushes_then_loads_from_hub_and_offline(hub, tmp_path):
    hub.state.token = FAKE_TOKEN
    out = tmp_path / "pushed"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--num_eval_images",
        "4",
        "--num_inference_steps",
        "10",
        "--push_to_hub",
        "--hub_model_id",
        "org/ddpm-cifar",
        "--logger",
        "tensorboard",
    ]
    proc = run_train(args, tmp_path, HF_HUB_OFFLINE="0", HF_TOKEN=FAKE_TOKEN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    repo = hub.state.repos["org/ddpm-cifar"]
    pushed = set(repo.head[1])
    assert {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "README.md",
        "samples.png",
    } <= pushed
    assert not any(p.startswith(("checkpoints", "logs", "samples/")) or p.endswith((".bin", ".pkl")) for p in pushed)
    # the trainer's push route: a card naming the repo, that parses, whose snippet runs against the repo
    from conftest import card_snippet, run_snippets

    card = repo.head[1]["README.md"].decode()
    assert 'DDPMPipeline.from_pretrained("org/ddpm-cifar")' in card and "![samples](samples.png)" in card
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.license == "cc-by-4.0"
    run_snippets({"org/ddpm-cifar": card_snippet(card)}, tmp_path, token=FAKE_TOKEN)

    # TensorBoard logged the training scalars, the sample grid and the bound estimate through accelerate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss", "lr", "images_per_s", "grad_norm", "ema_decay"} <= set(events.Tags()["scalars"])

    # the token is nowhere: output, logs, TensorBoard events, card, configs, checkpoints
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path

    # a fresh cache: from_pretrained("org/ddpm-cifar") through the real client, identical samples
    cache = tmp_path / "cache"
    remote = DDPMPipeline.from_pretrained("org/ddpm-cifar", cache_dir=cache)
    local = DDPMPipeline.from_pretrained(out)
    np.testing.assert_array_equal(sample_images(remote), sample_images(local))

    # offline, from the cache only, in a fresh process
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from ddpm_hub import DDPMPipeline
        p = DDPMPipeline.from_pretrained("org/ddpm-cifar", cache_dir={str(cache)!r})
        x = p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="np").images
        np.save({str(tmp_path / "offline.npy")!r}, x)
    """)
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # unreachable on purpose
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "offline.npy"), sample_images(local))


def test_push_command(hub, trained, capsys):
    from ddpm_hub.cli import main

    assert main(["push", "--folder", str(trained), "--repo_id", "org/from-cli", "--private"]) == 0
    assert hub.state.repos["org/from-cli"].private
    assert "model_index.json" in hub.state.repos["org/from-cli"].head[1]
    assert main(["push", "--folder", str(trained / "unet"), "--repo_id", "org/x"]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err


def test_repush_unchanged_is_noop_and_private_is_honoured(hub, trained):
    push_pipeline_folder(trained, "org/private-ddpm", token=None, private=True)
    repo = hub.state.repos["org/private-ddpm"]
    assert repo.private
    commits = len(repo.commits)
    push_pipeline_folder(trained, "org/private-ddpm", token=None, private=True)
    assert len(repo.commits) == commits  # nothing changed: no new commit


def test_stock_diffusers_loads_our_folder_without_ddpm_hub(trained, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ddpm_hub"] = None  # ddpm_hub cannot be imported in this process
        try:
            import ddpm_hub  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("ddpm_hub is importable")
        import numpy as np, torch, diffusers
        p = diffusers.DDPMPipeline.from_pretrained({str(trained)!r})
        assert type(p.scheduler).__module__.startswith("diffusers."), type(p.scheduler)
        x = p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="np").images
        np.save({str(tmp_path / "stock.npy")!r}, x)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = sample_images(DDPMPipeline.from_pretrained(trained))
    np.testing.assert_allclose(np.load(tmp_path / "stock.npy"), ours, rtol=0, atol=1e-6)


def test_loads_google_ddpm_cifar10_layout(tmp_path):
    """The layout of google/ddpm-cifar10-32: old scheduler keys, both .bin and .safetensors in unet/."""
    folder = tmp_path / "google"
    unet = create_unet("tiny", sample_size=8)
    unet.save_pretrained(folder / "unet")
    torch.save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMScheduler",
                "_diffusers_version": "0.1.1",
                "beta_end": 0.02,
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "clip_sample": True,
                "num_train_timesteps": 1000,
                "trained_betas": None,
                "variance_type": "fixed_large",
            }
        )
    )
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": "0.1.1",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }
        )
    )
    pipeline = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, DDPMScheduler)
    assert pipeline.scheduler.config.variance_type == "fixed_large"
    assert sample_images(pipeline, steps=5).shape == (2, 8, 8, 1)


@pytest.mark.skipif(
    not os.environ.get("DDPM_HUB_REAL_HUB_TOKEN"),
    reason="set DDPM_HUB_REAL_HUB_TOKEN (and DDPM_HUB_REAL_HUB_REPO) to run against the real Hub",
)
def test_real_hub_round_trip(trained, tmp_path):
    script = textwrap.dedent(f"""
        import os
        from ddpm_hub import DDPMPipeline
        from ddpm_hub.hub_push import push_pipeline_folder
        repo = os.environ["DDPM_HUB_REAL_HUB_REPO"]
        push_pipeline_folder({str(trained)!r}, repo, token=os.environ["DDPM_HUB_REAL_HUB_TOKEN"], private=True)
        DDPMPipeline.from_pretrained(repo, token=os.environ["DDPM_HUB_REAL_HUB_TOKEN"], cache_dir={str(tmp_path)!r})
    """)
    env = dict(os.environ)
    env.pop("HF_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_push_uploads_regular_files_only_and_refuses_a_link_naming_it(hub, trained, tmp_path):
    """A planted link (to a password or token file) in a pushed folder is refused before anything is uploaded:
    only regular files inside the folder go to the Hub, from the CLI and the API alike."""
    import shutil

    from ddpm_hub.cli import main as cli_main

    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    for planted in ("metrics.json", "README.md", "unet/config.json", "unet"):
        folder = tmp_path / planted.replace("/", "_")
        shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
        target = folder / planted
        if target.is_dir():
            shutil.copytree(target, tmp_path / f"{planted}-elsewhere")
            shutil.rmtree(target)
            target.symlink_to(tmp_path / f"{planted}-elsewhere", target_is_directory=True)
        else:
            target.unlink()
            target.symlink_to(secret)
        with pytest.raises(HubError, match=f"{target} is a symbolic link: only regular files inside the folder"):
            push_pipeline_folder(folder, "org/linked")
        assert cli_main(["push", "--folder", str(folder), "--repo_id", "org/linked"]) == 2
    assert "org/linked" not in hub.state.repos


# -- checks before any work --------------------------------------------------------------------------------------------


def test_unknown_hub_id_is_one_line_naming_it(hub, tmp_path):
    with pytest.raises(OSError, match="no Hub model repo 'org/nope'") as exc:
        DDPMPipeline.from_pretrained("org/nope", cache_dir=tmp_path / "cache")
    assert "\n" not in str(exc.value)
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="0")
    proc = subprocess.run([sys.executable, "-m", "ddpm_hub", "sample", "--model", "org/nope"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: org/nope: no such local folder, and no Hub model repo 'org/nope'")


@pytest.mark.parametrize("repo_id", ["org/..", "bad name", "org/bad name", "org/a--b"])
def test_push_to_hub_validates_the_repo_id_before_writing_anything(tmp_path, monkeypatch, repo_id):
    import tempfile

    from ddpm_hub.hub_push import HubError

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pipeline = tiny_pipeline()
    with pytest.raises(HubError, match="repo id|ORG/NAME"):
        pipeline.push_to_hub(repo_id)
    with pytest.raises(HubError, match="repo id|ORG/NAME"):
        pipeline.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=repo_id or None)
    assert list(scratch.iterdir()) == [] and not (tmp_path / "out").exists()


def test_push_checks_the_folder_and_weights_before_asking_the_hub(model_1000, tmp_path, capsys, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked before the arguments were checked")

    monkeypatch.setattr("ddpm_hub.hub_push.resolve_repo_id", no_hub)
    line = one_line_error(["push", "--folder", model_1000, "--repo_id", "bare-name", "--weights", "raw"], capsys)
    assert "--weights raw is for training checkpoint-N folders only" in line, line
    line = one_line_error(["push", "--folder", str(tmp_path), "--repo_id", "bare-name"], capsys)
    assert line == f"error: {tmp_path} is not a pipeline folder (no model_index.json): train first, then push"


def test_trainer_checks_credentials_before_training(hub, tmp_path):
    hub.state.token = "the-right-token"
    out = tmp_path / "denied"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--push_to_hub",
        "--hub_model_id",
        "org/ddpm",
    ]
    proc = run_train(args, tmp_path, HF_HUB_OFFLINE="0", HF_TOKEN=FAKE_TOKEN)
    assert proc.returncode == 2
    assert "not authorised" in proc.stderr
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert not (out / "checkpoints").exists()  # failed before any training


def test_hub_token_on_the_command_line_is_refused_without_repeating_it(tmp_path):
    """A token on a command line shows in `ps`, shell history and a launcher's error output: --hub_token is refused
    (HF_TOKEN or the saved login instead), and the refusal never repeats the value."""
    from ddpm_hub.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="--hub_token is not accepted.*set HF_TOKEN") as caught:
        parse_args(["--hub_token", FAKE_TOKEN])
    assert FAKE_TOKEN not in str(caught.value)
    proc = run_train([*FAST_ARGS, "--output_dir", str(tmp_path / "run"), "--hub_token", FAKE_TOKEN], tmp_path)
    assert proc.returncode == 2 and FAKE_TOKEN not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {ConfigError(HUB_TOKEN_REFUSED)}"]
    assert not (tmp_path / "run").exists()


# -- failures: retried, or reported at once ----------------------------------------------------------------------------


def test_push_retries_transient_errors_and_reports_permanent_ones(hub, trained):
    hub.state.faults = [Fault("POST", "/commit/", 500, times=2)]
    push_pipeline_folder(trained, "org/retry", base_delay=0.01)
    assert "model_index.json" in hub.state.repos["org/retry"].head[1]
    hub.state.token = "the-right-token"
    with pytest.raises(HubError, match="not authorised") as exc:
        check_push_access("org/denied", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(exc.value)
    with pytest.raises(HubError, match="'no slash!' is not a valid repo id"):
        check_push_access("no slash!", token=FAKE_TOKEN)  # found before any request
    with pytest.raises(HubError, match="not authorised"):
        check_push_access("no-slash", token=FAKE_TOKEN)  # a bare name asks whoami for the namespace
    assert (trained / "model_index.json").is_file()  # the local output is intact


def test_hub_faults_are_retried_or_reported_and_repush_completes(hub, trained, tmp_path):
    table = []
    # transient: 500s, a dropped connection and a stalled request during the upload are retried
    for fault in (
        Fault("POST", "/commit/", 503, times=2),
        Fault("POST", "/commit/", "drop"),
        Fault("POST", "/preupload/", "timeout"),
    ):
        hub.reset()
        hub.timeout_seconds = 0.5
        hub.state.faults = [fault]
        push_pipeline_folder(trained, "org/flaky", base_delay=0.01)
        assert "unet/diffusion_pytorch_model.safetensors" in hub.state.repos["org/flaky"].head[1]
        table.append((fault.action, "retried, pushed"))
    # permanent: 401/403 are reported at once with what to do; the local output is intact
    for status in (401, 403):
        hub.reset()
        hub.state.faults = [Fault("POST", "/commit/", status, times=10)]
        with pytest.raises(HubError, match="not authorised"):
            push_pipeline_folder(trained, "org/denied", base_delay=0.01)
        table.append((status, "reported"))
    # a failure that outlasts the retries, then a re-push that completes
    hub.reset()
    hub.state.faults = [Fault("POST", "/commit/", 500, times=10_000)]  # the client also retries 5xx itself
    with pytest.raises(HubError, match="failed after 2 attempt"):
        push_pipeline_folder(trained, "org/later", attempts=2, base_delay=0.01)
    assert (trained / "model_index.json").is_file() and (trained / "unet").is_dir()
    hub.state.faults = []
    push_pipeline_folder(trained, "org/later", attempts=3, base_delay=0.01)
    assert "model_index.json" in hub.state.repos["org/later"].head[1]
    # 404 on a repo when loading: a clear error naming the repo
    hub.reset()
    with pytest.raises(Exception, match="org/does-not-exist"):
        DDPMPipeline.from_pretrained("org/does-not-exist", cache_dir=tmp_path / "cache")
    assert len(table) == 5


def test_requests_the_client_retries_are_not_retried_again(hub, trained, monkeypatch):
    """One retry layer: a pre-upload that fails through huggingface_hub's own 5 retries is reported, not retried
    by a second layer around it (which would make 5 x 6 = 30 requests)."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # the client's backoff, made instant
    hub.state.faults = [Fault("POST", "/preupload/", 503, times=10_000)]
    with pytest.raises(HubError, match="failed after 1 attempt"):
        push_pipeline_folder(trained, "org/preupload-down", attempts=5, base_delay=0.01)
    preuploads = [r for r in hub.state.requests if "/preupload/" in r[1]]
    assert len(preuploads) == 6  # 1 + the client's 5 retries


def test_offline_mode_is_reported_at_once_not_retried(monkeypatch):
    calls = []
    monkeypatch.setattr("time.sleep", lambda s: calls.append(("sleep", s)))

    def action():
        calls.append("call")
        raise OfflineModeIsEnabled("offline mode is enabled")

    with pytest.raises(HubError, match=r"^creating org/m: offline mode is on \(HF_HUB_OFFLINE=1\)"):
        with_retries(action, "creating org/m", token=None)
    assert calls == ["call"]


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


def test_token_never_in_errors(hub, trained):
    token = "hf_SecretTokenThatMustNeverLeak42"
    hub.state.token = "another"
    with pytest.raises(HubError) as exc:
        push_pipeline_folder(trained, "org/x", token=token, base_delay=0.01)
    assert token not in str(exc.value) and token not in repr(exc.value.__cause__ or "")
    assert np.all([token not in line for line in str(exc.value).splitlines()])


def test_push_reads_the_files_it_checked_and_refuses_hard_links(hub, trained, tmp_path):
    """The upload reads the very files that were checked (opened without following links, before the Hub is
    asked): a link swapped in afterwards is never read; a hard link to a file elsewhere is refused naming it."""
    import shutil

    from ddpm_hub.hub_push import close_operations, pipeline_operations

    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    folder = tmp_path / "pipeline"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    original = (folder / "model_index.json").read_bytes()
    operations = pipeline_operations(folder, "org/swapped")
    (folder / "model_index.json").unlink()
    (folder / "model_index.json").symlink_to(secret)  # swapped in after the check, before the upload
    try:
        uploaded = {op.path_in_repo: op for op in operations}
        with uploaded["model_index.json"].as_file() as fh:
            assert fh.read() == original
    finally:
        close_operations(operations)
    (folder / "model_index.json").unlink()
    (folder / "model_index.json").write_bytes(original)
    (folder / "metrics.json").unlink()
    os.link(secret, folder / "metrics.json")  # a hard link: a regular file whose content lives elsewhere too
    with pytest.raises(HubError, match=r"metrics.json has 2 hard links: only regular files inside the folder"):
        push_pipeline_folder(folder, "org/hardlinked")
    assert "org/hardlinked" not in hub.state.repos


def test_a_token_typed_by_mistake_is_never_printed_back(tmp_path, capsys):
    """Misspelled token flags are unknown arguments, which argparse repeats: the token is redacted. The push command
    refuses --token like the trainer refuses --hub_token."""
    from ddpm_hub.cli import main as cli_main

    for argv in (["push", "--folder", "x", "--repo_id", "o/x", "--token", FAKE_TOKEN],
                 ["push", "--folder", "x", "--repo_id", "o/x", "--tokn", FAKE_TOKEN]):  # fmt: skip
        with pytest.raises(SystemExit) if "--tokn" in argv else nullcontext():
            assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert FAKE_TOKEN not in err and err.count("\n") == 1, err
    for argv in (["--hub-token", FAKE_TOKEN], ["--hub-tokn", FAKE_TOKEN]):
        proc = run_train([*argv, "--output_dir", str(tmp_path / "never")], tmp_path)
        assert proc.returncode == 2 and FAKE_TOKEN not in proc.stderr + proc.stdout, proc.stderr


def test_a_pushed_run_folder_carries_no_path_of_the_machine_that_trained_it(trained):
    """metrics.json goes to the Hub without the run's output_dir (a local path, which may name a user); the rest of
    it is unchanged, and the card's snippet loads the repo, not the folder."""
    from ddpm_hub.hub_push import close_operations, pipeline_operations

    local = json.loads((trained / "metrics.json").read_text())
    assert local["output_dir"] == str(trained)
    operations = pipeline_operations(trained, "me/ddpm-x")
    try:
        pushed = {op.path_in_repo: op.path_or_fileobj for op in operations}
        metrics = json.loads(pushed["metrics.json"])
        assert "output_dir" not in metrics and metrics == {k: v for k, v in local.items() if k != "output_dir"}
        assert str(trained) not in pushed["README.md"].decode() and "me/ddpm-x" in pushed["README.md"].decode()
    finally:
        close_operations(operations)
