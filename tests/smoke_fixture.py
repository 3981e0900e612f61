"""The whole smoke pipeline (notebooks 00-06), run once per test session.

conftest.py imports `smoke_results` from here, so every end-to-end test
shares one run. The report is built in a temporary copy of report/ (main.tex
and refs.bib only), so the repository's report folder is left untouched.
"""

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
    run_pipeline("smoke", results_dir=base / "results", overrides={"report_dir": str(report_dir)})
    return {"results_dir": base / "results", "report_dir": report_dir}
