"""The layering of docs/architecture.md, checked on the source (a lint that can fail CI).

- Layers point downward only: ``data_pipelines`` -> ``modalimmune_jax`` (model, methods,
  transforms) -> ``modalimmune_jax.training`` -> ``modalimmune_jax.studies`` -> ``experiments``
  (binaries and configs); ``data_pipelines.build`` and ``.hetero`` are entry points like the
  binaries.
- A binary under ``experiments/`` never imports another binary (only ``experiments.configs``).
- No module of the three source folders imports a ``_private`` name from another module, either
  as ``from x import _name`` or as ``x._name`` on an imported project module.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_pipelines", "modalimmune_jax", "experiments")
BINARIES = {"experiments.train", "experiments.evaluate", "experiments.reproduce",
            "experiments.unlearn", "experiments.benchmark", "experiments.bench_hvp",
            "experiments.sweep",
            "data_pipelines.build", "data_pipelines.hetero"}


def _modules():
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield rel.removesuffix(".__init__"), path


def _layer(module: str) -> int:
    """0 data, 1 library, 2 trainer, 3 studies, 4 binaries and configs."""
    if module in BINARIES:  # data_pipelines.build is an entry point, like the binaries
        return 4
    if module.startswith("data_pipelines"):
        return 0
    if module.startswith("modalimmune_jax.training"):
        return 2
    if module.startswith("modalimmune_jax.studies"):
        return 3
    if module.startswith("modalimmune_jax"):
        return 1
    return 4


def _imports(tree):
    """``(module imported, names taken from it, line)`` for every import in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno


def _project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


MODULES = dict(_modules())


def _parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def test_the_source_folders_hold_the_expected_modules():
    # The checks below must bite: they run over the real trees.
    assert "modalimmune_jax.training.trainer" in MODULES
    assert "experiments.train" in MODULES and "data_pipelines.pipeline" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_downward(module):
    tree = _parse(MODULES[module])
    for imported, names, line in _imports(tree):
        if not _project(imported):
            continue
        targets = [imported] + [f"{imported}.{n}" for n in names
                                if f"{imported}.{n}" in MODULES]
        for target in targets:
            assert _layer(target) <= _layer(module), (
                f"{module}:{line} imports {target}, a higher layer")
            if module.startswith("experiments."):
                assert target not in BINARIES or target == module, (
                    f"{module}:{line} imports the binary {target}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_a_module(module):
    tree = _parse(MODULES[module])
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _project(alias.name):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and _project(node.module):
            for alias in node.names:
                assert not (alias.name.startswith("_") and not alias.name.startswith("__")), (
                    f"{module}:{node.lineno} imports the private {node.module}.{alias.name}")
                if f"{node.module}.{alias.name}" in MODULES:  # a submodule, used as x.name
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            raise AssertionError(f"{module}:{node.lineno} uses the private "
                                 f"{aliases[node.value.id]}.{node.attr}")
