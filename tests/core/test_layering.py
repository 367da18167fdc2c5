"""The package's layers, checked: the core imports neither the application nor the CPU backend.

Two checks. Statically, every ``import`` in the core's source files (found with
``ast``, also the ones inside functions) names only the core, the standard
library and the core's dependencies; no module imports a private name
(``_name``) of another jaxtrain module. Dynamically, importing the core's
public names in a fresh interpreter loads none of the command line's libraries
(OmegaConf, YAML, tqdm, matplotlib, TensorBoard), torch or the kernel modules
beyond what the core's own dependencies load (Flax itself imports ``yaml``).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "jaxtrain"
# The entry-point shims (``python -m jaxtrain.run`` / ``jaxtrain.generate`` / ``jaxtrain``) start the
# application; they are not part of the core and nothing imports them.
ENTRY_POINTS = {"run.py", "generate.py", "__main__.py"}
CORE = sorted(p for p in PACKAGE.rglob("*.py")
              if p.relative_to(PACKAGE).parts[0] not in ("app", "cpu") and p.name not in ENTRY_POINTS)
THIRD_PARTY_CORE = {"jax", "jaxlib", "flax", "optax", "numpy", "orbax", "safetensors"}  # safetensors: in hf.py only
APP_LIBRARIES = ("omegaconf", "yaml", "tqdm", "matplotlib", "tensorboardX", "torch")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, [names], line)`` of every import statement in ``path``, relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                module = ".".join([*base, module] if module else base)
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def test_the_core_is_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in CORE}
    assert {"state.py", "step.py", "optim.py", "ops.py", "parallel.py", "models/gpt.py"} <= names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_modules_import_only_the_core_and_its_dependencies(path):
    stdlib = sys.stdlib_module_names
    for module, names, line in _imports(path):
        top = module.split(".")[0]
        where = f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        if top == "jaxtrain":
            parts = module.split(".")
            assert len(parts) < 2 or parts[1] not in ("app", "cpu", "run", "generate"), where
            subs = [f"{module}.{n}" for n in names]
            assert not any(s.startswith(("jaxtrain.app", "jaxtrain.cpu")) for s in subs), where
        else:
            assert top in stdlib or top in THIRD_PARTY_CORE or top == "__future__", where


def test_no_module_imports_another_modules_private_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, names, line in _imports(path):
            if module.startswith("jaxtrain"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(PACKAGE)}:{line} imports {private} from {module}"


def test_no_module_reads_a_private_attribute_of_another_jaxtrain_module():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()  # local names bound to jaxtrain modules or their contents
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxtrain"):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("jaxtrain")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                raise AssertionError(f"{path.relative_to(PACKAGE)}:{node.lineno} reads {node.value.id}.{node.attr}")


def test_importing_the_core_leaves_the_application_and_the_backend_unloaded():
    forbidden = (f"lambda: sorted(m for m in sys.modules if m.split('.')[0] in {APP_LIBRARIES!r} "
                 "or m.startswith(('jaxtrain.app', 'jaxtrain.cpu')))")
    code = (
        "import sys\n"
        f"loaded = {forbidden}\n"
        "import jax, numpy, optax, orbax.checkpoint, flax.nnx, flax.struct\n"
        "before = set(loaded())\n"
        "from jaxtrain import *\n"
        "from jaxtrain import TrainState, train_step, eval_step, make_optimizer, lm_loss, OptimConfig\n"
        "from jaxtrain.models import *\n"
        "from jaxtrain.models import GPT, GPTConfig, from_torch_state_dict, to_torch_state_dict\n"
        "import jaxtrain.ops, jaxtrain.parallel, jaxtrain.diagnostics, jaxtrain.losses\n"
        "print(sorted(set(loaded()) - before), 'omegaconf' in before, 'tqdm' in before)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] False False", r.stdout
