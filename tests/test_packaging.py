"""A plain (non-editable) install gives `ddpm_hub` with its pipelines, trainer and card template, and no generic
top-level `pipelines`/`training` modules."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, subprocess_env


def test_plain_install_imports_from_anywhere(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert not (target / "pipelines").exists() and not (target / "training").exists()
    code = (
        "import ddpm_hub, ddpm_hub.pipelines, ddpm_hub.training.train as t; "
        "from ddpm_hub.hub import template_path; assert template_path().is_file(); "
        f"assert ddpm_hub.__file__.startswith({str(target)!r}); print(ddpm_hub.DDPMPipeline.__name__)"
    )
    env = subprocess_env(tmp_path, PYTHONPATH=str(target))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "DDPMPipeline"
