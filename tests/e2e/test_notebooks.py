"""The notebooks run top to bottom and their checks hold; the .ipynb files match their sources.

Each notebook is executed fresh with nbclient in a ``python3`` kernel running
this interpreter. A cell that raises (every claim in the notebooks is an
``assert``) fails the test with the cell's traceback.
"""

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.slow  # whole runs in subprocesses: the full suite, not the fast tier

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["01_pytorch_to_jax", "02_gradients_in_transformers"]


def _load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec for this interpreter, found first through JUPYTER_PATH.

    The notebooks then run with the packages of the test run, whatever other
    kernels are installed. The 8 fake devices of conftest.py are not passed on:
    the notebooks run as a user would run them.
    """
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("JAXTRAIN_DOCS", raising=False)  # never rewrite docs/ from a test


def _run(nb: nbformat.NotebookNode) -> None:
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_and_its_checks_hold(name, kernel_env):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    _run(nb)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    n_asserts = sum(c.source.count("assert ") for c in nb.cells if c.cell_type == "code")
    assert n_asserts >= 10, f"{name}: {n_asserts} asserts; every claim should be checked"


def test_a_failing_assert_fails_the_run(kernel_env):
    nb = build.to_notebook([("code", "x = 1"), ("code", "assert x == 2, 'claim broken'")])
    with pytest.raises(CellExecutionError, match="claim broken"):
        _run(nb)


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_matches_its_source(name):
    """The committed notebook is what notebooks/build.py makes of notebooks/src/<name>.py."""
    want = build.parse((NOTEBOOKS / "src" / f"{name}.py").read_text())
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    have = [(c.cell_type, c.source) for c in nb.cells]
    assert have == want, f"run `python notebooks/build.py` to regenerate {name}.ipynb"


def test_parse_percent_format():
    text = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n# %%\n\n# %%\ny = 2\n"
    assert build.parse(text) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("code", "y = 2")]
