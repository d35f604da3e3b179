"""AWS Glue: start job runs from a web request, and keep trying while the job is busy.

    python examples/glue_jobs.py                     # a self-contained run against moto

Glue answers `ConcurrentRunsExceededException` for as long as the previous run of a job
lasts (minutes, often). offload treats it as a throttle, "not now": it uses up no
attempts, the job's gate stays closed while the run lasts, and the call is tried again
with backoff until the run ends, for up to `max_throttled` seconds. Other jobs' runs go
on meanwhile, because each job has its own key.
"""

from __future__ import annotations

import logging
import sys

import tenacity

import offload

REGION = "eu-west-1"

# A Glue run lasts minutes: back off up to a minute between tries, keep trying three hours.
GLUE_RETRY = offload.RetryPolicy(
    wait=tenacity.wait_random_exponential(multiplier=1, max=60),
    max_throttled=3 * 3600,
)


def start_job(
    job: str, arguments: dict[str, str], retry: offload.RetryPolicy = GLUE_RETRY
) -> offload.Task:
    """Queue a Glue job run; returns at once (the web request does not wait for Glue)."""
    call = offload.aws("glue", "start_job_run", region=REGION, JobName=job, Arguments=arguments)
    # Glue limits concurrent runs per job, so each job gets its own throttle key: a busy
    # nightly job must not hold back the hourly one (the default key is per operation).
    return offload.enqueue_task(offload.Task(call, key=f"glue:{REGION}:{job}", retry=retry))


if __name__ == "__main__":
    import boto3
    from moto import mock_aws
    from moto.moto_api import state_manager

    logging.basicConfig(stream=sys.stdout, format="  offload: %(message)s")
    logging.getLogger("offload").setLevel(logging.INFO)  # show each retry it schedules
    # In moto a job run goes STARTING -> RUNNING -> SUCCEEDED a quarter of a second a step.
    state_manager.set_transition("glue::job_run", {"progression": "time", "seconds": 0.25})
    # moto's runs last half a second, not minutes: short waits, for the example only.
    quick = offload.RetryPolicy(
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=0.5), max_throttled=60
    )
    with mock_aws():
        glue = boto3.client("glue", region_name=REGION)
        for job in ("nightly-etl", "hourly-report"):
            glue.create_job(
                Name=job,
                Role="arn:aws:iam::123456789012:role/glue",
                Command={"Name": "glueetl", "ScriptLocation": f"s3://scripts/{job}.py"},
                ExecutionProperty={"MaxConcurrentRuns": 1},
            )
        for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
            start_job("nightly-etl", {"--day": day}, retry=quick)
        start_job("hourly-report", {"--hour": "09"}, retry=quick)

        offload.flush(timeout=60)
        stats = offload.stats()
        print(
            f"delivered {stats.succeeded}, retried {stats.retried}, dead letters "
            f"{stats.dead_lettered}"
        )
        for job in ("nightly-etl", "hourly-report"):
            runs = glue.get_job_runs(JobName=job)["JobRuns"]
            started = sorted(str(run["Arguments"]) for run in runs)
            print(f"{job}: {len(runs)} run(s) started: {', '.join(started)}")
    state_manager.unset_transition("glue::job_run")
