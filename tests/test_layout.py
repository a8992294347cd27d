"""The package's shape: no import cycles, dependencies pointing down (cli -> train -> methods ->
engine), methods that never reach into a training loop, files a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sparsetrain"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """sparsetrain modules imported by ``path`` anywhere (functions included), except under
    ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block)
        for n in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _imports(path, modules)
        # importing a package runs its __init__: a dependency on it; its own submodules are not
        graph[name] = {d for d in deps if d != name and not d.startswith(name + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _graph()
    # a package __init__ imports its own submodules; a submodule importing its parent package is
    # the cycle to avoid, so those edges stay in the graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


LOWER_THAN_TRAIN = (
    "sparsetrain.methods",
    "sparsetrain.masks",
    "sparsetrain.gradients",
    "sparsetrain.mask_ops",
    "sparsetrain.distributions",
    "sparsetrain.select",
    "sparsetrain.collectives",
    "sparsetrain.kernels",
    "sparsetrain.export",
    "sparsetrain.report",
    "sparsetrain.api",
    "sparsetrain.policy",
)


@pytest.mark.parametrize("layer", LOWER_THAN_TRAIN)
def test_nothing_below_the_loop_imports_it(layer):
    graph = _graph()
    offenders = {
        (m, d)
        for m, deps in graph.items()
        if m == layer or m.startswith(layer + ".")
        for d in deps
        if d.startswith(("sparsetrain.train", "sparsetrain.cli", "sparsetrain.compare"))
    }
    assert not offenders


def test_the_engine_knows_no_method():
    graph = _graph()
    engine = (
        "sparsetrain.masks",
        "sparsetrain.gradients",
        "sparsetrain.mask_ops",
        "sparsetrain.distributions",
        "sparsetrain.select",
        "sparsetrain.policy",
    )
    assert not {(m, d) for m in engine for d in graph[m] if d.startswith("sparsetrain.methods")}


def test_the_loop_knows_no_method_by_name():
    text = (PACKAGE / "train" / "loop.py").read_text()
    for name in ("gap", "pgap", "acdc", "ast", "rigl"):
        assert f'"{name}"' not in text and f"methods.{name}" not in text


@pytest.mark.parametrize("path", sorted((PACKAGE / "train").glob("*.py")), ids=lambda p: p.name)
def test_each_training_file_is_one_a_reader_can_hold(path):
    assert len(path.read_text().splitlines()) <= 400
