"""The example scripts run as a user would run them, and do what they say."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(ROOT / script)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_custom_model_example_loss_falls():
    out = _run("examples/custom_model.py")
    losses = [float(v) for v in re.findall(r"^step +\d+ +loss ([\d.]+)", out, re.M)]
    assert len(losses) == 5, out
    assert losses[-1] < losses[0] / 100, out
    eval_loss = float(re.search(r"^eval loss ([\d.]+)", out, re.M).group(1))
    assert eval_loss < losses[0] / 100, out
