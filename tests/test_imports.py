"""The package's import graph: no cycles, no module reaching into another's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedta_utils"


def package_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported module, imported names)] for every import of the package, functions included."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import a, b
                    edges += [(alias.name, []) for alias in node.names]
                else:
                    edges.append((node.module.split(".")[0], [alias.name for alias in node.names]))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedta_utils."):
                edges.append((node.module.split(".")[1], [alias.name for alias in node.names]))
        graph[path.stem] = edges
    return graph


def test_no_module_imports_another_modules_private_names():
    private = [
        (module, target, name)
        for module, edges in package_imports().items()
        for target, names in edges
        for name in names
        if name.startswith("_")
    ]
    assert private == []


def test_the_package_has_no_import_cycles():
    graph = {
        module: {target for target, _ in edges if target != module}
        for module, edges in package_imports().items()
    }
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_function_level_imports(tmp_path):
    source = "def f():\n    from .pipeline import _helper\n"
    edges = [
        (node.module, [a.name for a in node.names])
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
    ]
    assert edges == [("pipeline", ["_helper"])]
