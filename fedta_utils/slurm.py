"""pipeline --slurm: the N workers as Slurm jobs through submitit (an optional dependency), then the final
pass as a job that starts once every worker has succeeded.

A worker job that reaches its time limit is resubmitted by submitit (the Checkpointable hook) with the
same command: complete runs are read back and the run in progress resumes from its last checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable


class PipelineJob(Checkpointable):
    """`python -m fedta_utils.pipeline ARGV` as a job; checkpoint() (on the time limit) resubmits it."""

    def __call__(self, argv: list[str]) -> None:
        subprocess.run([sys.executable, "-m", "fedta_utils.pipeline", *argv], check=True)


def submit(argv: list[str], count: int, folder: Path, cluster: str, options: dict) -> list:
    """Submit `count` workers of the pipeline command `argv`, then its final pass; returns the jobs.

    `options` are submitit's (timeout_min, gpus_per_node, slurm_partition, slurm_account); on the local
    cluster (tests) the final pass is submitted once the workers have finished, as it has no dependencies.
    """
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(name="fedta", **{k: v for k, v in options.items() if v is not None})
    workers = [executor.submit(PipelineJob(), [*argv, "--worker", f"{i}/{count}"]) 
               for i in range(1, count + 1)]
    for i, job in enumerate(workers, 1):
        print(f"[pipeline] worker {i}/{count}: job {job.job_id}, log {job.paths.stdout}", flush=True)
    if cluster == "local":
        wait(workers)
    else:
        executor.update_parameters(slurm_dependency="afterok:" + ":".join(job.job_id for job in workers))
    final = executor.submit(PipelineJob(), argv)
    print(f"[pipeline] final pass: job {final.job_id}, log {final.paths.stdout}", flush=True)
    if cluster == "local":
        wait([final])
    return [*workers, final]


def wait(jobs: list) -> None:
    """Block until the jobs end; a failed one raises, naming its job and log."""
    for job in jobs:
        try:
            job.result()
        except Exception as error:
            raise RuntimeError(f"job {job.job_id} failed ({type(error).__name__}); log: {job.paths.stdout}, "
                               f"{job.paths.stderr}") from None
