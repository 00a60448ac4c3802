"""Every notebook in notebooks/ runs top to bottom without an error (its own cells assert its numbers).

Each runs in a fresh ``python3`` kernel of this interpreter, in a temporary working directory (so
its outputs land there), with ``SEGPIPE_DATA`` pointing at the shared data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs() -> None:
    assert NOTEBOOKS, f"no notebooks in {REPO / 'notebooks'}"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        dirty = [i for i, c in code if c.outputs or c.execution_count]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; strip them before committing"


def test_python3_kernel_is_this_interpreter() -> None:
    # jupyter_client runs a kernel command of plain "python" with sys.executable
    argv = KernelSpecManager().get_kernel_spec("python3").argv
    assert argv[0] in ("python", "python3", sys.executable), (
        f"the python3 kernel runs {argv[0]!r}, not {sys.executable}; remove that kernelspec or run "
        f"`{sys.executable} -m ipykernel install --sys-prefix`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGPIPE_DATA", str(data.resolve()))  # the kernel inherits this environment
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed (working directory {tmp_path}):\n{e}")
    finally:
        nbformat.write(nb, tmp_path / f"{path.stem}.executed.ipynb")  # kept for inspection
