"""The whole smoke pipeline (notebooks 00-06), run once per test session.

conftest.py imports `smoke_results` from here, so every end-to-end test
shares one run. The report is built in a temporary copy of report/ (main.tex
and refs.bib only), so the repository's report folder is left untouched.
"""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REPORT_SOURCES = ("main.tex", "refs.bib")


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory) -> dict:
    """{"results_dir": Path, "report_dir": Path} after running every notebook on the smoke profile."""
    from fedta_utils.pipeline import run_pipeline  # imported here: collecting the tests needs no pipeline

    base = tmp_path_factory.mktemp("smoke_pipeline")
    report_dir = base / "report"
    report_dir.mkdir()
    for name in REPORT_SOURCES:
        shutil.copy(REPO / "report" / name, report_dir / name)
    # One thread per notebook kernel (they inherit the environment): the results are then comparable bit
    # for bit with the team tests' workers, which share the 2 cores of CI one thread each.
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        run_pipeline("smoke", results_dir=base / "results", overrides={"report_dir": str(report_dir)})
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return {"results_dir": base / "results", "report_dir": report_dir}
