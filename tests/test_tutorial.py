"""The tutorial notebook: the committed `docs/tutorial.ipynb` is its source `docs/tutorial.py` rendered and run, and
running it now still works and still shows what its text claims."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, subprocess_env
from PIL import Image

DOCS = REPO / "docs"
NOTEBOOK = DOCS / "tutorial.ipynb"


def _builder():
    """docs/build_tutorial.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_tutorial", DOCS / "build_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _pngs(cell: nbformat.NotebookNode) -> list[Image.Image]:
    data = [o.data["image/png"] for o in cell.outputs if "data" in o and "image/png" in o.data]
    return [Image.open(io.BytesIO(base64.b64decode(d))) for d in data]


def _check_ran(nb: nbformat.NotebookNode) -> None:
    """Every code cell ran in order without an error; the tagged cells printed and drew what they claim."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].ename + ": " + errors[0].evalue
    expected = {
        "closed-form": "closed form q(x_t | x_0) matches the chained forward process",
        "posterior-check": "scheduler == eq. (7) == Bayes, and step() samples it",
        "reverse-check": "mean == eq. (11), learned variance == improved DDPM eq. (15)",
        "bound-check": "vlb_terms_bpd == eq. (12) for both fixed variances",
        "algorithm-2": "give exactly the hand-written loop's images",
    }
    for tag, text in expected.items():
        assert text in _stdout(_tagged(nb, tag)), tag
    # five timesteps checked in each of the closed-form, posterior, reverse and bound cells
    for tag in ("closed-form", "posterior-check", "reverse-check", "bound-check"):
        assert len(re.findall(r"^t=\s*\d+:", _stdout(_tagged(nb, tag)), flags=re.M)) >= 4, tag
    training = _stdout(_tagged(nb, "training"))
    first, last = map(float, re.search(r"first 50 steps ([\d.]+), over the last 50 ([\d.]+)", training).groups())
    assert last < 0.5 * first
    # the bound of the trained model, per variance type: finite, positive, learned <= both fixed ones
    totals = dict(re.findall(r"^(\w+)\s*: L_T .* = ([\d.]+) bits/dim", _stdout(_tagged(nb, "vlb-terms")), re.M))
    assert set(totals) == {"learned_range", "fixed_small", "fixed_large"}
    totals = {k: float(v) for k, v in totals.items()}
    assert 0 < totals["learned_range"] < min(totals["fixed_small"], totals["fixed_large"]) < 8
    fast = _stdout(_tagged(nb, "fast-samplers"))
    assert len(re.findall(r"^(DDIM|DPM-Solver\+\+|UniPC)\s+(\d+) steps", fast, re.M)) == 4
    # pictures: the strip of x_t, the schedule plot, the loss curve, the bound, the variance and the sample grids
    for tag in ("forward-strip", "schedules", "training", "vlb-terms", "learned-variance", "algorithm-2",
                "fast-samplers"):
        images = _pngs(_tagged(nb, tag))
        assert images, f"cell {tag!r} shows no picture"
        assert all(im.width >= 100 and im.height >= 50 for im in images), tag
    # the sampler comparison is one figure of five grids side by side: wider than tall
    wide = _pngs(_tagged(nb, "fast-samplers"))[0]
    assert wide.width > 3 * wide.height


def test_committed_notebook_is_built_from_its_source_with_outputs():
    """The .ipynb holds exactly the cells of docs/tutorial.py, was run to the end, and stays small."""
    builder = _builder()
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(committed)
    assert builder.cell_sources(committed) == builder.cell_sources(builder.notebook_from_source()), (
        "docs/tutorial.ipynb is out of date: run `python docs/build_tutorial.py`"
    )
    assert committed.metadata.kernelspec.name == "python3"
    _check_ran(committed)
    assert NOTEBOOK.stat().st_size < 1_500_000


@pytest.mark.slow
def test_tutorial_executes(tmp_path: Path):
    """Execute the tutorial from its source now, on the current code, in a kernel of this interpreter."""
    builder = _builder()
    nb = builder.notebook_from_source()
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    builder.execute(nb, timeout=900, env=subprocess_env(tmp_path, threads=int(threads)))
    _check_ran(nb)
