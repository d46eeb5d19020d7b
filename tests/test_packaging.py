"""A plain (non-editable) install gives `ddpm_hub` with its pipelines, trainer and card template, and no generic
top-level `pipelines`/`training` modules; no import circle; every declared dependency is used."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
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


def test_no_module_of_the_package_imports_itself_through_others():
    """No import circle anywhere in the package, counting imports inside functions: each module has one job and
    depends only on modules below it (the layout docs/design.md describes)."""
    import ast

    packages = {"ddpm_hub": REPO / "ddpm_hub", "ddpm_hub.pipelines": REPO / "pipelines",
                "ddpm_hub.training": REPO / "training"}  # fmt: skip
    modules: dict[str, set[str]] = {}
    for package, folder in packages.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                    module = ".".join([*base, *([node.module] if node.module else [])])
                    found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
                elif isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
            modules[name] = found
    graph = {m: {d for d in deps if d in modules and d != m and d not in packages} for m, deps in modules.items()}

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == target:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    assert len(modules) > 30
    circles = sorted(m for m in graph if reaches(m, m))
    assert circles == [], circles


def test_no_unused_dependency():
    """Every declared runtime dependency is imported somewhere in the package (transformers was not)."""
    from pathlib import Path

    import tomllib

    repo = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps]
    source = "\n".join(p.read_text() for folder in ("ddpm_hub", "pipelines", "training") for p in
                       (repo / folder).rglob("*.py"))  # fmt: skip
    imports = {"scikit-learn": "sklearn", "huggingface-hub": "huggingface_hub", "pyyaml": "yaml", "pillow": "PIL"}
    through_other_libraries = {"tensorboard", "safetensors"}  # used by accelerate (tracker) and diffusers (weights)
    for name in set(names) - through_other_libraries:
        module = imports.get(name, name.replace("-", "_"))
        assert f"import {module}" in source or f"from {module}" in source, name
    assert os.environ.get("HF_ENDPOINT", "").startswith("http://127.0.0.1")
    assert torch.get_num_threads() >= 1
