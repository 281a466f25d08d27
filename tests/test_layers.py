"""Layers that only point down: no pe_rlhf subpackage imports one above it, not even inside a function.

Every module under pe_rlhf/ is parsed (nothing is imported); each import statement, wherever it stands
(module level, inside a function, under `if TYPE_CHECKING`), and each `importlib.import_module("pe_rlhf...")`
is an edge from the importing unit (a subpackage such as `train`, or a top-level module such as `cli`) to
the imported one. The units and their order are the table below.
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pe_rlhf"

# Lowest first. A unit may import only units of a lower row; units of one row never import each other.
LAYERS = (
    ("pe_rlhf", "config_checks"),  # the package root (`__init__.py`: its version) and the options' value checks
    ("sharding",),  # meshes, logical-axis rules, multi-host start-up, compiled per-device memory
    ("models",),  # the transformer, LoRA, the reward head
    ("checkpoints",),  # HF safetensors, GGUF, PEFT export, Orbax; `from_pretrained` and `load_backbone`
    ("data", "sampling", "rl"),  # datasets and batching; the sampler; the pure RL math
    ("train",),  # the steps, the loops, the stages
    ("eval", "profiling"),  # judges and win rates; step builders, AOT plans, timing
    ("runs",),  # a finished run's workdir
    ("cli",),  # python -m pe_rlhf's commands
    ("__main__",),
)
LEVEL = {unit: i for i, row in enumerate(LAYERS) for unit in row}

Edge = collections.namedtuple("Edge", "source target where")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """'pe_rlhf.train.supervised' -> 'train'; 'pe_rlhf.cli' -> 'cli'; 'pe_rlhf' (or a name in its
    `__init__`, e.g. `from pe_rlhf import __version__`) -> 'pe_rlhf'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "pe_rlhf"
    if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
        return parts[1]
    return "pe_rlhf"


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute module names an import node (or an import_module call) names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, up level - 1 more
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pe_rlhf import train` and `from pe_rlhf.train import supervised` name submodules
        return [f"{base}.{alias.name}" for alias in node.names] if base == "pe_rlhf" else [base]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def import_edges() -> list[Edge]:
    """Every import of one pe_rlhf unit by another (same-unit imports left out), with file:line."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        source = unit_of(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported(node, module, path.name == "__init__.py"):
                top = name.split(".")[0]
                if top == "experiments":
                    edges.append(Edge(source, "experiments", f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"))
                if top != "pe_rlhf":
                    continue
                target = unit_of(name)
                if target != source:
                    edges.append(Edge(source, target, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}"))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.fixture(scope="module")
def edges():
    return import_edges()


def test_the_parser_sees_imports_in_functions_and_from_package_forms():
    tree = ast.parse("from pe_rlhf import train, eval\n"
                     "def f():\n    from pe_rlhf.profiling.plan import plan_step\n    import pe_rlhf.models.lora\n"
                     "    from .. import checkpoints\n    importlib.import_module('pe_rlhf.data')\n")
    names = [n for node in ast.walk(tree) for n in _imported(node, "pe_rlhf.train.supervised", False)]
    assert sorted(unit_of(n) for n in names) == ["checkpoints", "data", "eval", "models", "profiling", "train"]


def test_every_unit_is_in_the_table(edges):
    units = {unit_of(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    missing = sorted(units - set(LEVEL))
    assert not missing, f"pe_rlhf units missing from LAYERS in {__file__}: {missing}; give each its row"


def test_no_cycle_between_units(edges):
    graph = collections.defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    cycle = find_cycle(graph)
    if cycle:
        where = [e.where for a, b in zip(cycle, cycle[1:]) for e in edges if (e.source, e.target) == (a, b)]
        pytest.fail(f"import cycle {' -> '.join(cycle)}:\n  " + "\n  ".join(where))


def test_every_import_points_down(edges):
    up = [f"{e.where}: {e.source} (row {LEVEL.get(e.source)}) imports {e.target} (row {LEVEL.get(e.target)})"
          for e in edges if e.target not in LEVEL or e.source not in LEVEL or LEVEL[e.target] >= LEVEL[e.source]]
    assert not up, "imports that do not point down the layers:\n  " + "\n  ".join(up)
