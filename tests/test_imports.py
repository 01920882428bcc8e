"""The project's modules import each other without cycles (issue 23).

The import graph is read from the source with `ast`, counting every import:
at module level, inside functions (where a cycle hides until the function
runs) and under `if TYPE_CHECKING`. An edge goes to the module a statement
names: `from pipeline.runs import history` -> pipeline.runs.history (a submodule),
`from transforms.cam import METHODS` -> transforms.cam (the package's
__init__), `from .x import y` resolved against the importing module.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "transforms", "bench")


def project_modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(folder, name)
    return modules


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The project modules that `module` imports anywhere in its source."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    found = set()

    def add(name: str) -> None:
        if name in modules and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 50 and "pipeline.graph" in graph and "transforms.cam.methods" in graph
    assert {"pipeline.finalize", "pipeline.runs.history"} <= graph["pipeline.graph"]  # `from pipeline(.runs) import ...`
    assert "transforms.cam" in graph["pipeline.options"] or "transforms.cam.methods" in graph["pipeline.options"]


def test_finds_a_cycle_it_is_shown():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among the project's modules:\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)

