"""The notebooks' layout: each shows the experiment it runs.

The Colab bootstrap is one short first code cell, the same everywhere. Each parameters cell lists the
experiment's own knobs first and ends with the shared workspace block (workspace.WORKSPACE_PARAMETERS, in
that order); a parameter whose None means "chosen on validation" is typed `float | None`, and papermill
still injects its value. Each grid runs in a cell `experiments.run(ws, data, experiments.X, params)`,
right after a cell that shows it (`experiments.grid_table(experiments.X, params)`) under a markdown
cell that asks what it answers. Notebook code passes no `wait=`, no search regime, never rebinds
`params`, and imports and assigns nothing it does not use.
"""

from __future__ import annotations

import ast
import json
import re

import papermill
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from fedta_utils import experiments, pipeline
from fedta_utils.workspace import (
    WORKSPACE_PARAMETERS,
    declared_parameters,
    discover_notebooks,
    profile_values,
)

NOTEBOOKS = discover_notebooks()
GRID_NOTEBOOKS = list(experiments.NOTEBOOK_EXPERIMENTS)  # 01-05: every workspace parameter
CHOSEN_ON_VALIDATION = re.compile(r"None: .*(choos|chose|choice)")  # the help of such a parameter says so
OPTIONAL = ("float | None", "str | None")  # a value chosen on validation, or None
TYPED = {
    "lr",
    "weight_decay",
    "ridge_lambda",
    "sparse_lr",
    "sparse_central_lr",
    "central_scheduler",
    "central_weight_decay",
    "fedavgm_server_lr",
    "fedavgm_server_momentum",
    "prox_mu",
    "ties_density",
    "ties_server_lr",
}


def cells(key: str) -> list[dict]:
    """The cells of notebook `key`, as stored."""
    return json.loads(NOTEBOOKS[key].read_text())["cells"]


def text(cell: dict) -> str:
    """A cell's source."""
    return "".join(cell["source"])


def is_parameters(cell: dict) -> bool:
    """Whether `cell` is the parameters cell papermill injects after."""
    tags = cell["metadata"].get("tags", [])
    return "parameters" in tags


def code_trees(key: str) -> list[ast.Module]:
    """Every code cell of notebook `key` but the parameters cell, parsed."""
    trees = []
    for cell in cells(key):
        if cell["cell_type"] == "code" and not is_parameters(cell):
            trees.append(ast.parse(text(cell)))
    return trees


def nodes(trees: list[ast.Module], kind: type) -> list[ast.AST]:
    """Every node of type `kind` in `trees`."""
    found = []
    for tree in trees:
        found += [node for node in ast.walk(tree) if isinstance(node, kind)]
    return found


def names(trees: list[ast.Module], context: type) -> list[str]:
    """The names `trees` read (context ast.Load) or bind (ast.Store)."""
    used = nodes(trees, ast.Name)
    return [node.id for node in used if isinstance(node.ctx, context)]


def parameter_lines(key: str) -> dict[str, str]:
    """Each parameter's line of notebook `key`'s parameters cell."""
    [cell] = [c for c in cells(key) if is_parameters(c)]
    lines = {}
    for line in text(cell).splitlines():
        match = re.match(r"(\w+)\s*[:=]", line)
        if match:
            lines[match.group(1)] = line
    return lines


def typed_optional(key: str) -> list[str]:
    """The parameters of notebook `key` annotated `float | None`."""
    declared = declared_parameters(NOTEBOOKS[key])
    return [name for name, info in declared.items() if info["inferred_type_name"] in OPTIONAL]


# --------------------------------------------------------------------------- bootstrap and parameters


def test_the_colab_bootstrap_is_the_same_short_first_code_cell_in_every_notebook():
    bootstraps = set()
    for key in NOTEBOOKS:
        notebook = cells(key)
        kinds = [cell["cell_type"] for cell in notebook[:2]]
        assert kinds == ["markdown", "code"], key
        assert is_parameters(notebook[2]), f"{key}: the parameters cell follows the bootstrap"
        bootstrap = text(notebook[1])
        assert 'find_spec("fedta_utils") is None' in bootstrap, key
        assert "REPO_URL = " in bootstrap, key
        assert len(bootstrap.splitlines()) <= 8, key
        bootstraps.add(bootstrap)
    assert len(bootstraps) == 1


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_the_experiments_knobs_come_first_and_the_workspace_block_last_in_its_order(key):
    declared = list(declared_parameters(NOTEBOOKS[key]))
    shared = [name for name in declared if name in WORKSPACE_PARAMETERS]
    assert shared, key
    assert declared[-len(shared) :] == shared, f"{key}: a knob among or after the workspace block"
    in_order = [name for name in WORKSPACE_PARAMETERS if name in shared]
    assert shared == in_order, f"{key}: the workspace block out of order"
    if key in GRID_NOTEBOOKS:
        assert shared == list(WORKSPACE_PARAMETERS), key


def test_the_grid_notebooks_share_one_workspace_block_line_for_line():
    blocks = []
    for key in GRID_NOTEBOOKS:
        lines = parameter_lines(key)
        blocks.append([lines[name] for name in WORKSPACE_PARAMETERS])
    assert all(block == blocks[0] for block in blocks)


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_a_parameter_chosen_on_validation_when_none_is_typed_optional(key):
    for name, info in declared_parameters(NOTEBOOKS[key]).items():
        chosen = CHOSEN_ON_VALIDATION.search(info["help"]) is not None
        typed = info["inferred_type_name"] in OPTIONAL
        assert typed == chosen, f"{key}: {name}"
        if chosen:
            assert info["default"] == "None", f"{key}: {name}"


def test_the_chosen_parameters_are_typed_optional_and_read_although_papermill_skips_them():
    typed = set()
    for key, path in NOTEBOOKS.items():
        typed |= set(typed_optional(key))
        seen_by_papermill = set(papermill.inspect_notebook(str(path)))
        assert seen_by_papermill <= set(declared_parameters(path)), key
    assert typed == TYPED


@pytest.mark.parametrize("key", GRID_NOTEBOOKS)
def test_papermill_injects_values_into_the_float_or_none_parameters(key):
    declared = declared_parameters(NOTEBOOKS[key])
    typed = typed_optional(key)
    smoke = {name: value for name, value in profile_values("smoke").items() if name in declared}
    injected = {**smoke, **dict.fromkeys(typed, 0.125)}
    notebook = load_notebook_node(str(NOTEBOOKS[key]))  # as papermill reads it
    notebook = parameterize_notebook(notebook, injected)
    position = next(i for i, cell in enumerate(notebook.cells) if is_parameters(cell))
    assert "injected-parameters" in notebook.cells[position + 1].metadata.tags
    namespace = {}
    for cell in notebook.cells[position : position + 2]:  # the parameters cell, then papermill's
        exec(cell.source, namespace)
    assert {name: namespace[name] for name in injected} == injected
    defaults = pipeline.notebook_values(NOTEBOOKS[key], "smoke", {})
    assert set(defaults) == set(declared)
    assert [defaults[name] for name in typed] == [None] * len(typed)  # None until injected


# --------------------------------------------------------------------------- notebook code


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_no_wait_no_regime_string_and_params_bound_once(key):
    trees = code_trees(key)
    code = "\n".join(ast.unparse(tree) for tree in trees)
    keywords = [keyword.arg for keyword in nodes(trees, ast.keyword)]
    assert "wait=" not in code and "wait" not in keywords, key
    strings = {node.value for node in nodes(trees, ast.Constant)}
    assert not strings & set(experiments.SEARCHED), f"{key}: a search regime in notebook code"
    stores = [name for name in names(trees, ast.Store) if name == "params"]
    assert len(stores) == (0 if key == "07" else 1), f"{key}: params bound by setup_notebook only"
    lower_level = re.findall(r"experiments\.(run_grid|run_search|with_choice|\w+_configs)\b", code)
    assert not lower_level, f"{key}: {lower_level}"


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_every_import_and_assignment_is_used(key):
    trees = code_trees(key)
    imported = []
    for node in nodes(trees, (ast.Import, ast.ImportFrom)):
        imported += [(alias.asname or alias.name).split(".")[0] for alias in node.names]
    loaded = set(names(trees, ast.Load))
    assert set(imported) <= loaded, f"{key}: unused imports"
    assert set(names(trees, ast.Store)) <= loaded, f"{key}: unused assignments"


def run_calls(cell: dict) -> list[ast.Call]:
    """The experiments.run(...) calls of a cell."""
    if cell["cell_type"] != "code":
        return []
    found = nodes([ast.parse(text(cell))], ast.Call)
    return [call for call in found if ast.unparse(call.func) == "experiments.run"]


def run_experiment(call: ast.Call, key: str) -> str:
    """The name of the experiment constant an experiments.run call passes, checked: exactly
    (ws, data, experiments.X, params), no keywords."""
    arguments = [ast.unparse(arg) for arg in call.args]
    assert not call.keywords and len(arguments) == 4, key
    constant = arguments[2].removeprefix("experiments.")
    assert arguments == ["ws", "data", f"experiments.{constant}", "params"], key
    assert getattr(experiments, constant, None) in experiments.EXPERIMENTS, f"{key}: {constant}"
    return constant


@pytest.mark.parametrize("key", list(NOTEBOOKS))
def test_each_grid_runs_after_a_table_of_it_under_a_markdown_question(key):
    notebook = cells(key)
    ran = []
    for position, cell in enumerate(notebook):
        found = run_calls(cell)
        if not found:
            continue
        [call] = found  # one grid per cell
        constant = run_experiment(call, key)
        ran.append(getattr(experiments, constant))
        where = f"{key}: {constant}"
        table = notebook[position - 1]
        question = notebook[position - 2]
        assert table["cell_type"] == "code", where
        assert text(table) == f"experiments.grid_table(experiments.{constant}, params)", where
        assert question["cell_type"] == "markdown", where
        assert text(question).startswith("## "), where
        assert "?" in text(question), f"{where}: the markdown above asks what the grid answers"
    expected = experiments.NOTEBOOK_EXPERIMENTS.get(key, [])
    assert ran == expected, f"{key}: the grids pipeline --dry-run counts, in the order they run"
