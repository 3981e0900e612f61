"""The whole smoke pipeline (notebooks 00-07), run once per test session, in the background.

It is the longest piece of the suite (about 7 minutes on a 2-core machine) and uses one core (one
thread per notebook kernel), so it starts with the session's first test, in a process of its own,
while the other tests run on the other core. conftest.py orders the tests that read it last:

- `smoke_pipeline`: the pipeline, possibly still running. A test that only compares its own runs with
  the pipeline's at the end (a team test) runs its scenario first, then calls `.result()`.
- `smoke_results`: the pipeline once it has ended; the first test that asks waits for it.

The report is built in a temporary copy of report/ (main.tex and refs.bib only), so the
repository's report folder is left untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REPORT_SOURCES = ("main.tex", "refs.bib")
SMOKE_TIMEOUT = 1800  # seconds; the pipeline takes about 600 on CI's 2 cores


def smoke_stage(item) -> int:
    """0: the test does not read the smoke pipeline; 1: it reads it at its end (smoke_pipeline);
    2: it reads it from its start (smoke_results)."""
    names = getattr(item, "fixturenames", ())
    if "smoke_results" in names:
        return 2
    return 1 if "smoke_pipeline" in names else 0


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
        command = [
            sys.executable,
            "-m",
            "fedta_utils.pipeline",
            "--profile",
            "smoke",
            "--results-dir",
            str(self.results_dir),
            "-p",
            "report_dir",
            str(self.report_dir),
        ]
        with open(self.log, "w") as log:  # a session of its own: stop() ends its notebook kernels too
            self.process = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        torch.set_num_threads(1)  # the pipeline has the other core: two threads here would wait on each other

    def result(self) -> dict:
        """Wait for the pipeline; {"results_dir": Path, "report_dir": Path} once it has succeeded. A
        pipeline that hangs is stopped after SMOKE_TIMEOUT, and every later call fails at once."""
        try:
            code = self.process.wait(timeout=SMOKE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            code = f"killed after {SMOKE_TIMEOUT} s"
        torch.set_num_threads(self.threads)  # both cores are free again
        assert code == 0, f"the smoke pipeline failed ({code}; {self.log}):\n{self.log.read_text()[-4000:]}"
        return {"results_dir": self.results_dir, "report_dir": self.report_dir}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        torch.set_num_threads(self.threads)


@pytest.fixture(scope="session", autouse=True)
def start_smoke_pipeline(request, tmp_path_factory):
    """Starts the smoke pipeline with the session's first test, if any selected test reads it."""
    if not any(smoke_stage(item) for item in request.session.items):
        yield None
        return
    pipeline = SmokePipeline(tmp_path_factory.mktemp("smoke_pipeline"))
    yield pipeline
    pipeline.stop()


@pytest.fixture(scope="session")
def smoke_pipeline(start_smoke_pipeline) -> SmokePipeline:
    """The smoke pipeline, which may still be running: call .result() to wait for it."""
    return start_smoke_pipeline


@pytest.fixture(scope="session")
def smoke_results(smoke_pipeline) -> dict:
    """{"results_dir": Path, "report_dir": Path} after every notebook ran on the smoke profile."""
    return smoke_pipeline.result()
