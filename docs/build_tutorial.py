"""Build `docs/tutorial.ipynb` from its source `docs/tutorial.py` (jupytext percent format) and execute it.

Usage: `python docs/build_tutorial.py` (about a minute on a CPU; `OMP_NUM_THREADS=2` on a 2-core machine). Edit
the `.py`, never the `.ipynb`: `tests/test_tutorial.py` checks that the two hold the same cells and runs the
notebook. The notebook is executed with an IPython kernel of the interpreter that runs this script, in `docs/`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parent
SOURCE = DOCS / "tutorial.py"
NOTEBOOK = DOCS / "tutorial.ipynb"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def notebook_from_source(source: Path = SOURCE) -> nbformat.NotebookNode:
    """The notebook of the jupytext script, without outputs, with only the kernelspec as notebook metadata."""
    nb = jupytext.read(source)
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC})
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("lines_to_next_cell", None)  # jupytext's layout hint, meaningless in a .ipynb
        cell.id = f"cell-{index:02d}"  # stable ids (jupytext draws random ones), so rebuilds diff only where changed
    return nb


def cell_sources(nb: nbformat.NotebookNode) -> list[tuple[str, str, list[str]]]:
    """(type, source, tags) of every cell: what must agree between the script and the committed notebook."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def execute(nb: nbformat.NotebookNode, timeout: int = 600, env: dict[str, str] | None = None) -> None:
    """Run every cell in place, in `docs/`, with a python3 kernel of this interpreter; raises on the first error."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    with tempfile.TemporaryDirectory() as kernels:
        # A kernelspec for sys.executable, so that no other installed "python3" kernel is picked up.
        write_kernel_spec(Path(kernels) / "python3")
        km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = NotebookClient(
            nb, km=km, timeout=timeout, record_timing=False, resources={"metadata": {"path": str(DOCS)}}
        )
        client.execute(**({} if env is None else {"env": env}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=NOTEBOOK, help="where to write the executed notebook")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    nb = notebook_from_source()
    execute(nb, timeout=args.timeout)
    nbformat.validate(nb)
    nbformat.write(nb, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
