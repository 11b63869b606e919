"""The notebooks in notebooks/ run top to bottom in a fresh kernel of this interpreter within a time budget.

Notebooks are stored without outputs and use only the public API. Their cells assert what they show
(shapes, a falling loss), so an API change that breaks a notebook fails here. The kernel is the current
interpreter's (`python3`; jupyter_client starts `sys.executable` for it, and an injected first cell
checks `sys.prefix`). It inherits this process's environment, including conftest's XLA flags, with
conftest's threefry setting and `V4JAX_CACHE` set to a directory shared by this test session, so nothing
is written under the home directory. Each notebook is a separate test, so pytest-xdist spreads them over
workers.

Budgets: a per-cell timeout guards against hangs. The kernel's CPU seconds (user + system, every thread)
do not depend on how loaded the machine is, so they carry the real budget. Wall time is asserted with
room for a machine shared by several jobs.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import sys
import time

import jax
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

CELL_TIMEOUT_S = 600  # one cell; the longest compiles the training step
STARTUP_TIMEOUT_S = 180  # kernel start (importing ipykernel) on a loaded machine
CPU_BUDGET_S = 240  # kernel CPU seconds per notebook
WALL_BUDGET_S = 900  # per notebook, kernel start included

_CHECK_KERNEL = f"""import sys
assert sys.prefix == {sys.prefix!r}, f"kernel runs {{sys.executable}}, not the test interpreter {sys.executable!r}"
"""
_REPORT_USAGE = """import json, resource
_usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": _usage.ru_utime + _usage.ru_stime}))
"""


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """The environment of the notebook kernels: this process's, plus the cache root and conftest's threefry."""
    env = dict(os.environ)
    env["V4JAX_CACHE"] = str(tmp_path_factory.mktemp("v4jax_cache"))
    env["JAX_THREEFRY_PARTITIONABLE"] = str(jax.config.jax_threefry_partitionable).lower()
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, as in Jupyter
    return env


def _cell_seconds(cell: nbformat.NotebookNode) -> float:
    """Execution time of an executed code cell, from nbclient's timestamps."""
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return float("nan")
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, kernel_env: dict[str, str]):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_CHECK_KERNEL, id="test-check-kernel"))
    nb.cells.append(nbformat.v4.new_code_cell(_REPORT_USAGE, id="test-report-usage"))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=STARTUP_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    wall = time.perf_counter() - start

    cpu = json.loads(nb.cells[-1].outputs[0]["text"])["cpu_s"]
    cells = ", ".join(f"{c.id} {_cell_seconds(c):.0f}s" for c in nb.cells[1:-1] if c.cell_type == "code")
    report = f"{path.name}: wall {wall:.0f} s, kernel CPU {cpu:.0f} s ({cells})"
    print(report)
    assert cpu < CPU_BUDGET_S, f"over the CPU budget of {CPU_BUDGET_S} s: {report}"
    assert wall < WALL_BUDGET_S, f"over the wall budget of {WALL_BUDGET_S} s: {report}"


def test_notebooks_are_stored_clean():
    """Stored without outputs or execution counts, listed in notebooks/README.md, no private v4jax names."""
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    private = re.compile(r"\bv4jax(\.\w+)*\._\w+")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"
        assert path.name in readme, f"{path.name} is not described in notebooks/README.md"
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {cell.id} has outputs"
            assert not private.search(cell.source), f"{path.name} cell {cell.id} uses a private v4jax name"
