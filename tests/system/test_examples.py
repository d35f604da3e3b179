"""examples/: each runs as written (a subprocess), and its app works under its framework's
test client against a real local server, in eager mode and in the background."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import offload
from offload.testing import assert_dead_lettered, assert_no_dead_letters, eager
from server import Answer, ScriptedServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module", autouse=True)
def _examples_importable() -> Iterator[None]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLES))


def example(name: str) -> ModuleType:
    return importlib.import_module(name)


SCRIPTS = (
    "flask_app",
    "fastapi_app",
    "django_app",
    "glue_jobs",
    "stripe_like",
    "web_and_worker",
    "console_flask",
    "console_django",
    "console_fastapi",
)


# The PostgreSQL recipes: each gets a database of its own on the session's server.
PG_SCRIPTS = ("postgres_psycopg", "postgres_sqlalchemy", "postgres_django")


class Runs:
    """Every example started at once as `python examples/NAME.py` (they mostly wait on
    imports and on local servers, so together they take about as long as the slowest).
    `databases`: name -> DATABASE_URL, for the examples that need one."""

    def __init__(
        self, scripts: tuple[str, ...] = SCRIPTS, databases: dict[str, str] | None = None
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "AWS_"))}
        env.pop("DATABASE_URL", None)
        databases = databases or {}
        self.procs = {
            name: subprocess.Popen(
                [sys.executable, str(EXAMPLES / f"{name}.py")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, **({"DATABASE_URL": databases[name]} if name in databases else {})},
                cwd=EXAMPLES.parent,
            )
            for name in scripts
        }

    def output(self, name: str, timeout: float = 60) -> str:
        """Wait for one example; its stdout, once it exited 0 without a traceback."""
        out, err = self.procs[name].communicate(timeout=timeout)
        assert self.procs[name].returncode == 0, err
        assert "Traceback" not in err
        return out

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    started = Runs()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def pg_runs(postgres: Any) -> Iterator[Runs]:
    databases = {name: postgres.create_database(f"{name}_{os.getpid()}") for name in PG_SCRIPTS}
    started = Runs(PG_SCRIPTS, databases)
    try:
        yield started
    finally:
        started.close()


# -- each runs as written -------------------------------------------------------------------


def test_flask_example_runs(runs: Runs) -> None:
    out = runs.output("flask_app")
    assert out.count("201 ") == 3
    assert out.count("CRM received POST /contacts") == 3
    assert "{'email': 'grace@example.com'}" in out
    assert "stats: 3 delivered" in out


def test_fastapi_example_runs(runs: Runs) -> None:
    out = runs.output("fastapi_app")
    assert [line.split()[0] for line in out.splitlines()[:3]] == ["202"] * 3
    for n in (1, 2, 3):
        assert f"Idempotency-Key: order-A{n}" in out


def test_django_example_runs(runs: Runs) -> None:
    out = runs.output("django_app")
    assert out.count("201 ") == 2
    received = [line for line in out.splitlines() if line.startswith("CRM received")]
    assert len(received) == 2  # not the rolled-back one
    assert "rolled-back@example.com" not in "".join(received)


def test_glue_example_runs_through_concurrent_runs_exceeded(runs: Runs) -> None:
    out = runs.output("glue_jobs")
    assert "nightly-etl: 3 run(s) started" in out
    assert "hourly-report: 1 run(s) started" in out
    assert "dead letters 0" in out
    throttled = [line for line in out.splitlines() if "ConcurrentRunsExceededException" in line]
    assert throttled and all("throttled" in line for line in throttled)


def test_web_and_worker_example_delivers_what_a_killed_web_process_enqueued(runs: Runs) -> None:
    out = runs.output("web_and_worker")
    assert "enqueued 20 | web process: SIGKILL" in out
    assert "delivered before the worker started: 0" in out
    assert "delivered by the worker: 20 of 20, each once: True" in out
    assert "worker exit code: 0" in out
    assert "dead letters 0" in out


@pytest.mark.parametrize("name", PG_SCRIPTS)
def test_postgres_transaction_recipes_run(pg_runs: Runs, name: str) -> None:
    out = pg_runs.output(name)
    assert "orders in the table: ['order-1', 'order-3']" in out
    received = [line for line in out.splitlines() if line.startswith("CRM received")]
    assert sorted(received) == ["CRM received order-1", "CRM received order-3"]  # not order-2
    assert "delivered 2, dead letters 0" in out


def test_stripe_like_example_charges_once_per_key(runs: Runs) -> None:
    out = runs.output("stripe_like")
    assert "requests received: 5, charges made: 2" in out  # 2 x (502, replay) + 1 declined
    assert "charge-1001: {'id': 'ch_1', 'amount': 2000}" in out
    assert "[permanent] HTTP 402" in out
    assert "sk_test" not in out


def test_console_mounted_in_flask_logs_in_and_replays_every_match(runs: Runs) -> None:
    out = runs.output("console_flask")
    assert "login: 303 /ops/offload/dead-letters" in out
    assert "console: <strong>2</strong> dead letters in all" in out
    assert "replay: 303 /ops/offload/dead-letters?done=replayed&n=2" in out
    assert "CRM accepted 2 replayed" in out and "dead letters now: 0" in out


def test_console_wrapped_around_django_asks_the_app_who_may_see_it(runs: Runs) -> None:
    out = runs.output("console_django")
    assert "django: {'orders': []}" in out, "Django still serves the rest"
    assert "stranger: 401" in out
    assert "ops: <strong>1</strong> dead letter in all" in out
    assert "call: POST http://127.0.0.1:" in out and "/hooks/order-paid" in out
    assert "discard: 303 /ops/offload/dead-letters?done=discarded&n=1" in out
    assert "dead letters now: 0" in out


def test_console_mounted_in_fastapi_read_only_through_a2wsgi(runs: Runs) -> None:
    out = runs.output("console_fastapi")
    assert "app: {'ok': True}" in out
    assert "api: total 1 status 422" in out
    assert "replay (read-only): 403" in out and "no token: 401" in out
    assert "metrics: offload_dead_letters 1.0" in out


# -- Flask ----------------------------------------------------------------------------------


@pytest.fixture
def flask_app(server: ScriptedServer) -> ModuleType:
    module = example("flask_app")
    module.app.config["CRM_URL"] = server.base_url
    return module


def test_flask_signup_in_eager_mode(server: ScriptedServer, flask_app: ModuleType) -> None:
    client = flask_app.app.test_client()
    with eager():
        response = client.post("/signup", json={"email": "ada@example.com"})
        # Eager: the CRM call was made before the response came back.
        [received] = server.requests_to("/contacts")
        assert_no_dead_letters()
    assert response.status_code == 201
    assert received.method == "POST" and received.body == b'{"email": "ada@example.com"}'
    assert received.headers["Idempotency-Key"]
    assert received.headers["Authorization"] == "Bearer demo"


def test_flask_signup_in_the_background_and_the_ops_view(
    server: ScriptedServer, flask_app: ModuleType
) -> None:
    server.script("/contacts", Answer(503), Answer(201), Answer(400))
    client = flask_app.app.test_client()
    assert client.post("/signup", json={"email": "ada@example.com"}).status_code == 201
    assert offload.flush(10)
    assert client.post("/signup", json={"email": "bad"}).status_code == 201
    assert offload.flush(10)
    status = client.get("/ops/offload").get_json()
    assert (status["succeeded"], status["retried"], status["dead_lettered"]) == (1, 1, 1)
    [letter] = status["dead_letters"]
    assert letter["status"] == 400 and letter["reason"] == "permanent"
    assert "demo" not in str(status)  # the Authorization header's token


def test_flask_signup_survives_a_full_queue(
    server: ScriptedServer, flask_app: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    server.script("/contacts", Answer.hang(release), Answer(201))
    offload.configure(max_queue=1)
    client = flask_app.app.test_client()
    try:
        assert client.post("/signup", json={"email": "a@example.com"}).status_code == 201
        assert server.wait_for(1, path="/contacts")  # in flight, hanging
        assert client.post("/signup", json={"email": "b@example.com"}).status_code == 201
        with caplog.at_level(logging.WARNING):
            assert client.post("/signup", json={"email": "c@example.com"}).status_code == 201
        assert "CRM queue full; c@example.com" in caplog.text
        assert offload.stats().rejected == 1
    finally:
        release.set()


# -- FastAPI --------------------------------------------------------------------------------


@pytest.fixture
def fastapi_app(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = example("fastapi_app")
    monkeypatch.setattr(module, "WAREHOUSE_URL", server.base_url)
    return module


def test_fastapi_order_in_eager_mode(server: ScriptedServer, fastapi_app: ModuleType) -> None:
    from fastapi.testclient import TestClient

    with eager(), TestClient(fastapi_app.app) as client:
        response = client.post("/orders", json={"id": "A7", "sku": "tea", "quantity": 2})
        [received] = server.requests_to("/shipments")
    assert response.status_code == 202 and response.json()["order"] == "A7"
    assert received.headers["Idempotency-Key"] == "order-A7"
    assert b'"quantity": 2' in received.body


def run_uvicorn(server: ScriptedServer, app: str, app_dir: Path, calls: int) -> set[str]:
    """`uvicorn app` (a real process), `calls` orders posted to it, then SIGTERM; the order
    ids the stand-in warehouse received once it exited."""
    import signal
    import socket

    import requests

    server.script("/shipments", Answer(202, delay=0.004))  # slower than the requests come
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update(WAREHOUSE_URL=server.base_url, PYTHONPATH=str(EXAMPLES.parent / "src"))
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), app]
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("uvicorn did not start")
        with requests.Session() as session:
            for n in range(calls):
                answer = session.post(
                    f"http://127.0.0.1:{port}/orders",
                    json={"id": f"U{n}", "sku": "tea", "quantity": 1},
                    timeout=10,
                )
                assert answer.status_code == 202
        assert len(server.requests_to("/shipments")) < calls, "all sent already: no test"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err
    return {body["id"] for r in server.requests_to("/shipments") if (body := _whole(r.body))}


def _whole(body: bytes) -> Any:
    """The JSON of a request's body, or None if the server never got all of it (the
    process died while sending it, seen on a loaded machine: that call was not delivered)."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def test_fastapi_under_uvicorn_delivers_every_call_on_sigterm(server: ScriptedServer) -> None:
    """uvicorn raises SIGTERM again after its own shutdown, so exit hooks never run: the
    example's lifespan shuts offload down, and every call of 500 requests is sent."""
    assert len(run_uvicorn(server, "fastapi_app:app", EXAMPLES, 500)) == 500


def test_without_the_lifespan_uvicorn_loses_what_is_queued(server: ScriptedServer) -> None:
    """Why the recipe shuts offload down in the lifespan: without it, the calls still
    queued at SIGTERM are never sent (the README names uvicorn among such servers)."""
    from procs import SUPPORT

    assert len(run_uvicorn(server, "uvicorn_bare_app:app", Path(SUPPORT), 500)) < 500


def test_fastapi_lifespan_flushes_on_shutdown(
    server: ScriptedServer, fastapi_app: ModuleType
) -> None:
    from fastapi.testclient import TestClient

    server.script("/shipments", Answer(200, delay=0.3))
    with TestClient(fastapi_app.app) as client:
        for n in range(3):
            client.post("/orders", json={"id": f"B{n}", "sku": "tea", "quantity": 1})
    # Leaving the client ran the lifespan's shutdown, which flushed.
    assert len(server.requests_to("/shipments")) == 3
    assert offload.stats().succeeded == 3


def test_fastapi_full_queue_answers_503(server: ScriptedServer, fastapi_app: ModuleType) -> None:
    from fastapi.testclient import TestClient

    release = threading.Event()
    server.script("/shipments", Answer.hang(release), Answer(200))
    offload.configure(max_queue=1)
    try:
        with TestClient(fastapi_app.app) as client:
            order = {"sku": "tea", "quantity": 1}
            assert client.post("/orders", json={"id": "C1", **order}).status_code == 202
            assert server.wait_for(1, path="/shipments")
            assert client.post("/orders", json={"id": "C2", **order}).status_code == 202
            response = client.post("/orders", json={"id": "C3", **order})
            assert response.status_code == 503
            release.set()
    finally:
        release.set()
    assert offload.stats().succeeded == 2


# -- Django ---------------------------------------------------------------------------------


def test_django_signup_enqueues_after_commit(server: ScriptedServer) -> None:
    django_app = example("django_app")
    from django.db import transaction
    from django.test import Client, override_settings

    with override_settings(CRM_URL=server.base_url), eager():
        response = Client().post(
            "/signup", {"email": "ada@example.com"}, content_type="application/json"
        )
        assert response.status_code == 201
        assert [r.body for r in server.requests_to("/contacts")] == [
            b'{"email": "ada@example.com"}'
        ]

        with transaction.atomic():
            django_app.tell_crm("grace@example.com")
            assert len(server.requests_to("/contacts")) == 1  # not before the commit
        assert len(server.requests_to("/contacts")) == 2

        def failed_signup() -> None:
            with transaction.atomic():
                django_app.tell_crm("rolled-back@example.com")
                raise RuntimeError("signup failed")

        with pytest.raises(RuntimeError):
            failed_signup()
        assert len(server.requests_to("/contacts")) == 2  # a rollback sends nothing
        assert Client().get("/signup").status_code == 405


# -- AWS Glue -------------------------------------------------------------------------------


def test_glue_start_job_uses_a_key_per_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    glue_jobs = example("glue_jobs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws(), eager():
        glue = boto3.client("glue", region_name=glue_jobs.REGION)
        glue.create_job(
            Name="etl",
            Role="arn:aws:iam::123456789012:role/glue",
            Command={"Name": "glueetl", "ScriptLocation": "s3://scripts/etl.py"},
        )
        task = glue_jobs.start_job("etl", {"--day": "2026-01-01"})
        missing = glue_jobs.start_job("no-such-job", {})
        runs = glue.get_job_runs(JobName="etl")["JobRuns"]
        [letter] = assert_dead_lettered(reason="permanent")
    assert task.key == "glue:eu-west-1:etl" and missing.key == "glue:eu-west-1:no-such-job"
    assert [run["Arguments"] for run in runs] == [{"--day": "2026-01-01"}]
    assert letter.description == "glue.start_job_run" and "EntityNotFound" in letter.error


# -- a POST with an idempotency key -----------------------------------------------------------


def test_stripe_like_retry_reuses_the_key_and_charges_once() -> None:
    stripe_like = example("stripe_like")
    from _local_api import LocalAPI

    payments = stripe_like.FakePayments()
    with LocalAPI(payments) as api:
        first = stripe_like.charge(api.url, "42", 1500, "tok_visa")
        stripe_like.charge(api.url, "43", 700, "tok_chargeDeclined")
        auth = {"Authorization": f"Bearer {stripe_like.API_KEY}"}
        offload.enqueue_task(
            offload.http("POST", f"{api.url}/v1/charges", data={"amount": 1}, headers=auth)
        )
        assert offload.flush(30)
        received = api.received
    keys = [r.headers.get("idempotency-key") for r in received]
    assert keys.count("charge-42") == 2  # the lost answer, then the replayed one
    assert payments.charges == {"charge-42": {"id": "ch_1", "amount": 1500}}
    assert first.attempts == 2
    letters = {dl.status: dl for dl in offload.dead_letters()}
    assert set(letters) == {400, 402}  # no key: the API refuses; declined: permanent
    assert all(dl.reason == "permanent" and dl.attempts == 1 for dl in letters.values())
    assert "sk_test" not in repr(offload.dead_letters())
