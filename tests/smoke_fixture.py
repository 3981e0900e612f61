"""The whole smoke pipeline (notebooks 00-06), run once per test session, in the background.

It is the longest piece of the suite (about 8 minutes on a 2-core machine) and uses one core (one
thread per notebook kernel), so it starts as soon as the first test of a session that needs it is
set up, in a process of its own, while the tests that do not need it run on the other core.
conftest.py orders the tests that need it last; the first of them waits for it to end.

The report is built in a temporary copy of report/ (main.tex and refs.bib only), so the
repository's report folder is left untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REPORT_SOURCES = ("main.tex", "refs.bib")
SMOKE_TIMEOUT = 1800  # seconds; the pipeline takes about 500 on CI's 2 cores


def uses_smoke_pipeline(item) -> bool:
    return "smoke_results" in getattr(item, "fixturenames", ())


class SmokePipeline:
    """`python -m fedta_utils.pipeline --profile smoke` in a process of its own, its output in a log."""

    def __init__(self, base: Path):
        self.results_dir = base / "results"
        self.report_dir = base / "report"
        self.report_dir.mkdir(parents=True)
        for name in REPORT_SOURCES:
            shutil.copy(REPO / "report" / name, self.report_dir / name)
        self.log = base / "pipeline.log"
        self.threads = torch.get_num_threads()  # this process's threads once the pipeline has ended
        # One thread per notebook kernel (they inherit the environment): the results are then comparable
        # bit for bit with the team tests' workers, which also run one thread each.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "fedta_utils.pipeline", "--profile", "smoke",
                   "--results-dir", str(self.results_dir), "-p", "report_dir", str(self.report_dir)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)

    def result(self) -> dict:
        """Wait for the pipeline; {"results_dir": Path, "report_dir": Path} once it has succeeded."""
        code = self.process.wait(timeout=SMOKE_TIMEOUT)
        assert code == 0, f"the smoke pipeline failed ({self.log}):\n{self.log.read_text()[-4000:]}"
        return {"results_dir": self.results_dir, "report_dir": self.report_dir}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session", autouse=True)
def smoke_pipeline(request, tmp_path_factory):
    """Starts the smoke pipeline with the session's first test, if any selected test needs it."""
    if not any(uses_smoke_pipeline(item) for item in request.session.items):
        yield None
        return
    pipeline = SmokePipeline(tmp_path_factory.mktemp("smoke_pipeline"))
    torch.set_num_threads(1)  # the pipeline has the other core: two threads here would wait on each other
    yield pipeline
    pipeline.stop()
    torch.set_num_threads(pipeline.threads)


@pytest.fixture(scope="session")
def smoke_results(smoke_pipeline) -> dict:
    """{"results_dir": Path, "report_dir": Path} after every notebook ran on the smoke profile."""
    results = smoke_pipeline.result()
    torch.set_num_threads(smoke_pipeline.threads)  # both cores are free again
    return results
