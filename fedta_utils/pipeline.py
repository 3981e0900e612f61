"""Run the numbered notebooks in order with papermill.

    python -m fedta_utils.pipeline --profile smoke
    python -m fedta_utils.pipeline --profile full --only 02 03 -p seeds "[0, 1]"
    python -m fedta_utils.pipeline --profile full --dry-run

Executed copies go to <results_dir>/<profile>/notebooks/. Parameters come
from, in increasing priority: the notebook's parameters cell (the full
profile), the profile's values (profiles.py), and `-p NAME VALUE`. A -p name
that no selected notebook declares is an error, as is an unknown notebook in
--only. The first failing notebook stops the pipeline with its failing cell
and error printed.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path

from .checks import ConfigError, check_choice
from .profiles import PROFILES, profile_values

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"


def discover_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> dict[str, Path]:
    """{'00': .../00_data_splits.ipynb, ...} for every numbered notebook, in order."""
    found = sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    return {path.name[:2]: path for path in found}


def declared_parameters(path: Path) -> dict[str, dict]:
    """The parameters cell of a notebook: name -> {'default': source text, 'inferred_type_name', 'help'}."""
    import papermill

    return papermill.inspect_notebook(str(path))


def parse_value(text: str):
    """A -p value as a Python literal if it is one (1, 0.5, [0, 1], True, None), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def select_notebooks(only: list[str] | None, notebooks: dict[str, Path]) -> dict[str, Path]:
    if not only:
        return notebooks
    keys = [key[:2] for key in only]
    unknown = [key for key in keys if key not in notebooks]
    if unknown:
        raise ConfigError(f"--only {unknown}: no such notebook; available: {sorted(notebooks)}")
    return {key: notebooks[key] for key in notebooks if key in keys}


def notebook_parameters(path: Path, profile: str, results_dir: Path, overrides: dict) -> dict:
    """What papermill injects into one notebook: profile values and overrides it declares."""
    declared = declared_parameters(path)
    values = {"profile": profile, "results_dir": str(results_dir)}
    values.update(profile_values(profile))
    values.update(overrides)
    return {name: value for name, value in values.items() if name in declared}


def check_overrides(overrides: dict, selected: dict[str, Path]) -> None:
    """Every -p name must be a parameter of at least one selected notebook."""
    declared = set()
    for path in selected.values():
        declared |= set(declared_parameters(path))
    unknown = sorted(set(overrides) - declared)
    if unknown:
        raise ConfigError(f"-p {unknown[0]}: no selected notebook declares a parameter of that name; "
                          f"declared: {sorted(declared)}")


def run_pipeline(profile: str, only: list[str] | None = None, results_dir: str | Path = "results",
                 overrides: dict | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[dict]:
    """Execute the selected notebooks in order; returns one record per notebook with its wall time."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    check_choice("profile", profile, tuple(PROFILES))
    overrides = overrides or {}
    selected = select_notebooks(only, discover_notebooks(notebook_dir))
    if not selected:
        raise ConfigError(f"no numbered notebooks found in {notebook_dir}")
    check_overrides(overrides, selected)
    results_dir = Path(results_dir).resolve()
    output_dir = results_dir / profile / "notebooks"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"results_dir={str(results_dir)!r} is not writable ({error}); "
                          "choose a folder you can write to") from error
    records = []
    for path in selected.values():
        parameters = notebook_parameters(path, profile, results_dir, overrides)
        print(f"[pipeline] {path.name} ({profile}) with {parameters}", flush=True)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(str(path), str(output_dir / path.name), parameters=parameters,
                                       kernel_name=KERNEL, cwd=str(path.parent.parent), progress_bar=False)
        except PapermillExecutionError as error:
            raise NotebookFailed(path.name, error) from None
        seconds = time.perf_counter() - started
        print(f"[pipeline] {path.name} done in {seconds:.1f} s", flush=True)
        records.append({"notebook": path.name, "seconds": seconds})
    return records


ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


class NotebookFailed(RuntimeError):
    """A notebook raised; the message holds its failing cell and the error."""

    def __init__(self, name: str, error):
        source = "\n".join("    " + line for line in str(error.source).splitlines())
        traceback = ANSI_ESCAPES.sub("", "\n".join(error.traceback[-6:])) if error.traceback else ""
        super().__init__(f"{name} failed in cell {error.exec_count}:\n{source}\n"
                         f"{error.ename}: {error.evalue}\n{traceback}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedta_utils.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers to run, e.g. 00 01")
    parser.add_argument("--results-dir", default="results", help="root of all results (default: results)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a notebook parameter (a Python literal or a string)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the number of runs and estimated GPU-hours per notebook, run nothing")
    args = parser.parse_args(argv)
    overrides = {name: parse_value(value) for name, value in args.parameter}
    try:
        if args.dry_run:
            from .budget import print_budget

            print_budget(args.profile, args.only, overrides)
            return 0
        records = run_pipeline(args.profile, args.only, args.results_dir, overrides)
    except (ConfigError, NotebookFailed) as error:
        print(f"[pipeline] error: {error}", file=sys.stderr)
        return 1
    total = sum(r["seconds"] for r in records)
    print(f"[pipeline] {len(records)} notebooks in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
