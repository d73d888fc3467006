"""The package's layers: data flows one way, and every command runs under its name without warnings."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import phi2_jax

PACKAGE = Path(phi2_jax.__file__).parent

# Lowest first. A module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ("errors", "config", "sharding", "util"),
    ("model",),
    ("checkpoint",),
    ("hf",),
    ("data",),
    ("inference",),
    ("evaluation",),
    ("training",),
    ("bench",),
    # The public API and the `python -m phi2_jax.<command>` entry points sit on top of everything.
    ("__init__", "train", "convert", "generate", "evaluate", "pretokenize", "lm_eval_adapter"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
COMMANDS = ("train", "convert", "generate", "evaluate", "pretokenize", "lm_eval_adapter", "bench")


def top_name(module: str) -> str:
    """'phi2_jax.model.transformer' -> 'model'; 'phi2_jax' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def phi2_imports(path: Path, module: str) -> set[str]:
    """Every phi2_jax module that `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("phi2_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phi2_jax"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def all_modules() -> dict[str, Path]:
    modules = {"phi2_jax": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages(phi2_jax.__path__, "phi2_jax."):
        relative = info.name.split(".")[1:]
        path = PACKAGE.joinpath(*relative)
        modules[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return modules


def test_every_module_belongs_to_a_layer():
    unplaced = sorted({top_name(m) for m in all_modules()} - set(RANK))
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_no_layer_imports_a_later_one():
    violations = []
    for module, path in all_modules().items():
        own = RANK[top_name(module)]
        for imported in phi2_imports(path, module):
            target = top_name(imported)
            if target in RANK and RANK[target] > own:
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    # The test above must be able to fail: a model module importing the trainer is one.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from phi2_jax.training.trainer import Trainer\n")
    imported = phi2_imports(bad, "phi2_jax.model.bad")
    assert any(RANK[top_name(m)] > RANK["model"] for m in imported)


def test_subpackages_say_their_job():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 6, f"{init.parent.name}/__init__.py has no docstring saying its job"


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_run_under_their_names_without_warnings(command):
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", f"phi2_jax.{command}", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"python -m phi2_jax.{command}" in result.stdout
    assert "RuntimeWarning" not in result.stderr


def test_importing_the_package_changes_no_process_state():
    # Library code leaves backends, flags, logging and the allocator to the commands.
    probe = (
        "import logging, os, sys\n"
        "import matplotlib\n"
        "import orbax.checkpoint, grain, flax, optax, tensorstore  # third-party libraries may log at import\n"
        "before = (dict(os.environ), logging.getLogger().level, logging.getLogger().handlers[:], matplotlib.get_backend())\n"
        "import phi2_jax, phi2_jax.training.trainer, phi2_jax.hf.convert, phi2_jax.inference.generate\n"
        "import phi2_jax.evaluation.harness, phi2_jax.data.pretokenize, phi2_jax.bench.suites\n"
        "import jax\n"
        "after = (dict(os.environ), logging.getLogger().level, logging.getLogger().handlers[:], matplotlib.get_backend())\n"
        "assert before[0] == after[0], set(after[0].items()) ^ set(before[0].items())\n"
        "assert before[1:3] == after[1:3], (before[1:3], after[1:3])\n"
        "assert before[3] == after[3], (before[3], after[3])\n"
        "assert jax.config.jax_platforms in (None, ''), jax.config.jax_platforms\n"
        "print('clean')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MPLBACKEND",)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, env=env)
    assert result.stdout.strip() == "clean", result.stderr[-3000:]
