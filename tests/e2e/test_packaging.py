"""A non-editable install: the wheel carries the configs and the kernel source, and the ``jaxtrain``
command runs a packaged config by name from a directory that is not the source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_installed_wheel_runs_a_config_by_name(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("jaxtrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"jaxtrain/configs/tiny.yaml", "jaxtrain/configs/default.yaml", "jaxtrain/cpu/_cpu_kernels.cc",
            "jaxtrain/cpu/_onednn_gemm.cc", "jaxtrain/cpu/_thread_pool.h"} <= names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import jaxtrain; print(jaxtrain.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, timeout=300)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the wheel's copy, not the checkout
    r = subprocess.run([str(venv / "bin" / "jaxtrain"), "run", "--config", "tiny", f"run_dir={tmp_path / 'run'}",
                        "train.steps=2", "train.eval_batches=1", "train.sample_tokens=2", "log.progress=false",
                        "log.plot=false"], capture_output=True, text=True, cwd=elsewhere, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
                            "JAXTRAIN_COMPILATION_CACHE": "off"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 2 steps" in r.stdout
