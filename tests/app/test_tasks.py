"""Loading a task from the config's ``task`` key, and what the loop asks of one."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from jaxtrain.app import config, tasks
from jaxtrain.app.config import ConfigError


def _module(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
    import numpy as np
    from flax import nnx

    def model(rngs):
        return nnx.Linear(3, 1, rngs=rngs)

    def loss(model, batch, rng):
        return ((model(batch["x"])[:, 0] - batch["y"]) ** 2).mean()

    def batch(step, batch_size, seed):
        rng = np.random.default_rng([seed, step])
        x = rng.normal(size=(batch_size, 3))          # float64: converted to JAX's float32
        return {"x": x, "y": x.sum(1)}
    """


def test_a_module_with_model_loss_and_batch_is_a_task(tmp_path):
    path = _module(tmp_path, "good_task", GOOD)
    task = tasks.load(config.replace(config.Config(), task=str(path)))
    assert task.name == "good_task" and task.eval_batches is None and task.flops_per_example is None
    b = tasks.local_batch(task, 3, 8, 0)
    assert b["x"].dtype == np.float32 and b["x"].shape == (8, 3)
    np.testing.assert_array_equal(b["x"], tasks.local_batch(task, 3, 8, 0)["x"])  # pure in (step, size, seed)
    assert not np.array_equal(b["x"], tasks.local_batch(task, 4, 8, 0)["x"])
    state = tasks.state_factory(task, config.Config())()
    assert state.params["kernel"].shape == (3, 1)


def test_module_colon_attribute_names_a_task_or_a_function_returning_one(tmp_path, monkeypatch):
    _module(tmp_path, "several_tasks", GOOD + """
    from jaxtrain.app.tasks import Task

    small = Task(name="small", model=model, loss_fn=loss, batch=batch)

    def configured(cfg):
        return Task(name=f"seeded {cfg.train.seed}", model=model, loss_fn=loss, batch=batch)

    not_a_task = 3
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.Config()
    assert tasks.load(config.replace(cfg, task="several_tasks:small")).name == "small"
    assert tasks.load(config.replace(cfg, task="several_tasks:configured")).name == "seeded 0"
    with pytest.raises(ConfigError, match="'not_a_task' is a int, not a jaxtrain.app.tasks.Task"):
        tasks.load(config.replace(cfg, task="several_tasks:not_a_task"))
    with pytest.raises(ConfigError, match="module 'several_tasks' has no attribute 'nope'"):
        tasks.load(config.replace(cfg, task="several_tasks:nope"))


def test_what_is_missing_or_wrong_is_named(tmp_path, monkeypatch):
    cfg = config.Config()
    with pytest.raises(ConfigError, match="task='no_such_module_x': no module named 'no_such_module_x'"):
        tasks.load(config.replace(cfg, task="no_such_module_x"))
    with pytest.raises(ConfigError, match="task='.*nowhere.py': no such file"):
        tasks.load(config.replace(cfg, task=str(tmp_path / "nowhere.py")))
    partial = _module(tmp_path, "partial_task", "def model(rngs): pass\n")
    with pytest.raises(ConfigError, match="missing: loss, batch"):
        tasks.load(config.replace(cfg, task=str(partial)))
    broken = _module(tmp_path, "broken_task", "import no_such_dependency_y\n")
    with pytest.raises(ConfigError, match="importing it failed: ModuleNotFoundError"):
        tasks.load(config.replace(cfg, task=str(broken)))
    rows = _module(tmp_path, "rows_task", GOOD.replace("size=(batch_size, 3)", "size=(batch_size - 1, 3)"))
    task = tasks.load(config.replace(cfg, task=str(rows)))
    with pytest.raises(ConfigError, match=r"batch\(0, 8, 0\) returned leaf \['x'\] of shape \(7, 3\); every leaf "
                                          "needs a leading batch axis of 8 rows"):
        tasks.local_batch(task, 0, 8, 0)
    not_module = _module(tmp_path, "bad_model_task", GOOD.replace("return nnx.Linear(3, 1, rngs=rngs)", "return 3"))
    task = tasks.load(config.replace(cfg, task=str(not_module)))
    with pytest.raises(ConfigError, match="model\\(rngs\\) returned a int, not a flax.nnx.Module"):
        tasks.state_factory(task, cfg)()
