"""The package's import graph: no cycle, and no import back up the stages of the method.

Imports inside function bodies count too. A lazy import hides a cycle from Python but not from a
reader: two modules that need each other are one idea split in two (issue 10). The stages are
the package's folders in the order the chapters meet them; a module may import its own stage,
an earlier one, and the foundation (the modules at ``dem/``'s top level, which import no stage),
so each stage can be read knowing only the ones before it.
"""

import ast
from pathlib import Path

import dem

PACKAGE = Path(dem.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the dem modules it imports anywhere in its body."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from dem.x import y` may import the submodule dem.x.y
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_dem_has_no_import_cycle():
    graph = import_graph()
    assert "dem.cli" in graph and "dem.training.finetune" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_module_is_long():
    long = {
        p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420
    }
    assert not long, f"modules over ~400 lines: {long}"


def test_no_function_is_longer_than_a_screen():
    long = {
        f"{p.relative_to(PACKAGE)}:{node.name}": node.end_lineno - node.lineno + 1
        for p in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 60
    }
    assert not long, f"functions over 60 lines (docstring included): {long}"


# The stages, in order; the foundation (dem/*.py) comes before them all, and the command line
# (dem/cli, dem/__main__) after them.
STAGES = ("sources", "evaluation", "training", "merging", "search", "chapters", "run", "cli")

# The one import up the stages: the declaration of every run setting (dem.config, foundation, read
# by training's knobs for their defaults) checks ``merge_method`` and ``strategy`` against the names
# the merging and search stages register, imported when such a value is checked.
UPWARD = {("dem.config", "dem.merging.methods"), ("dem.config", "dem.search.strategies")}


def stage_of(module: str) -> int:
    """0 for the foundation, else 1 + the stage's place in STAGES."""
    parts = module.split(".")
    if module == "dem.__main__":
        return STAGES.index("cli") + 1
    return STAGES.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in STAGES else 0


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, dep) for m, deps in graph.items() for dep in deps if stage_of(dep) > stage_of(m)}


def test_stage_finder_finds_an_upward_import():
    graph = {"dem.io": set(), "dem.merging.merge": {"dem.io", "dem.search.weights"}}
    assert upward_imports(graph) == {("dem.merging.merge", "dem.search.weights")}
    assert stage_of("dem.sources") == 1 and stage_of("dem.models") == 0


def test_every_folder_is_a_stage():
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == set(STAGES), f"place every package in STAGES: {folders ^ set(STAGES)}"


def test_no_module_imports_a_later_stage():
    up = upward_imports(import_graph())
    assert up == UPWARD, f"imports up the stages (STAGES): {sorted(up - UPWARD)}"
