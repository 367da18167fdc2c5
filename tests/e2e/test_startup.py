"""Start-up of the package and the command line: lazy imports, and signals before the training loop."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_importing_the_package_and_the_cli_module_does_not_import_jax():
    r = _python("import sys, jaxtrain, jaxtrain.run\n"
                "from jaxtrain.app import cli\n"
                "cli.usage()\n"
                "assert 'jax' not in sys.modules, 'jax imported'\n"
                "from jaxtrain import TrainState, train_step, make_optimizer\n"
                "assert 'jax' in sys.modules and callable(train_step) and TrainState.__name__ == 'TrainState'\n"
                "print(sorted(set(jaxtrain.__all__) - set(dir(jaxtrain))))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_an_unknown_package_attribute_is_an_attribute_error():
    import jaxtrain

    assert set(jaxtrain.__all__) == set(jaxtrain._EXPORTS) | {"__version__"}
    with pytest.raises(AttributeError, match="module 'jaxtrain' has no attribute 'train_stpe'"):
        jaxtrain.train_stpe


@pytest.mark.parametrize("sig, code, first_word", [(signal.SIGTERM, 143, "SIGTERM:"),
                                                   (signal.SIGINT, 130, "interrupted:")])
def test_a_signal_during_start_up_is_one_line_and_leaves_no_run_dir(tmp_path, sig, code, first_word):
    # 1 s after the start the process is importing JAX or preparing the run: the training
    # loop, whose own handler saves a checkpoint, is seconds away.
    p = subprocess.Popen([sys.executable, "-m", "jaxtrain.run", "--config", "configs/tiny.yaml",
                          f"run_dir={tmp_path / 'run'}", "log.progress=false"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    lines = err.decode().strip().splitlines()
    assert p.returncode == code, err.decode()
    assert len(lines) == 1 and lines[0].startswith(first_word), lines
    assert "stopped outside the training loop" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
