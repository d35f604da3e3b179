"""offload.metrics: after a known run against a real local server, the Prometheus
exposition and the OpenTelemetry instruments hold the expected figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import offload
import offload.metrics
from offload import _default
from server import Answer, ScriptedServer


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from an exposition."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
def known_run(
    server: ScriptedServer, make_offloader: Callable[..., offload.Offloader]
) -> tuple[offload.Offloader, str]:
    """Four calls to one key: delivered at once; throttled once then delivered; a 503 then
    delivered; a 400 (a dead letter, reason permanent)."""
    server.script("/ok", Answer(200))
    server.script("/throttled", Answer(429, headers={"Retry-After": "0"}), Answer(200))
    server.script("/flaky", Answer(503), Answer(200))
    server.script("/bad", Answer(400))
    key = f"http://127.0.0.1:{server.port}"
    off = make_offloader(
        retry=offload.RetryPolicy(wait=tenacity.wait_none()), limits={key: "1000/s"}
    )
    for path in ("/ok", "/throttled", "/flaky", "/bad"):
        off.enqueue_task(offload.http("POST", server.url(path)))
    assert off.flush(10)
    return off, key


def test_the_exposition_after_a_known_run(known_run: tuple[offload.Offloader, str]) -> None:
    off, key = known_run
    registry = CollectorRegistry()
    offload.metrics.register(registry, off)
    got = samples(generate_latest(registry))
    assert got[("offload_tasks_enqueued_total", ())] == 4
    assert got[("offload_tasks_succeeded_total", ())] == 3
    assert got[("offload_tasks_dead_lettered_total", (("reason", "permanent"),))] == 1
    assert got[("offload_tasks_dead_lettered_total", (("reason", "exhausted"),))] == 0
    for outcome, n in (("success", 3), ("throttled", 1), ("transient", 1), ("permanent", 1)):
        assert got[("offload_attempts_total", (("key", key), ("outcome", outcome)))] == n
    for state in ("queued", "delayed", "in_flight"):
        assert got[("offload_tasks", (("state", state),))] == 0
    assert got[("offload_dead_letters", ())] == 1
    assert got[("offload_key_gate_open", (("key", key),))] == 1
    # Declared 1,000 a second; the 429 may have cut the adaptive rate below it.
    assert 0 < got[("offload_key_rate", (("key", key),))] <= 1000
    assert not any(name.startswith("offload_store_tasks") for name, _ in got)


def test_a_closed_gate_reads_0(server: ScriptedServer, make_offloader: Any) -> None:
    server.script("/slow-down", Answer(429, headers={"Retry-After": "60"}))
    off = make_offloader()
    off.enqueue_task(offload.http("GET", server.url("/slow-down")))
    # One worker: the sentinel (another key) is taken only once the throttle has been
    # settled and the gate closed.
    off.enqueue_task(offload.Task(offload.http("GET", server.url("/sentinel")), key="other"))
    assert server.wait_for(1, path="/sentinel")
    got = samples(offload.metrics.exposition(off))
    assert got[("offload_key_gate_open", (("key", f"http://127.0.0.1:{server.port}"),))] == 0
    assert got[("offload_tasks", (("state", "delayed"),))] == 1


def test_a_durable_store_adds_what_it_holds(tmp_path: Any, make_offloader: Any) -> None:
    off = make_offloader(store=f"sqlite:///{tmp_path / 'm.db'}", consume=False)
    off.enqueue_task(offload.http("POST", "http://127.0.0.1:9/never"))
    got = samples(offload.metrics.exposition(off))
    assert got[("offload_store_tasks", (("state", "ready"),))] == 1
    assert got[("offload_dead_letters", ())] == 0


def test_without_an_offloader_the_default_is_read_and_never_made() -> None:
    registry = CollectorRegistry()
    offload.metrics.register(registry)
    got = samples(generate_latest(registry))
    assert got[("offload_tasks_enqueued_total", ())] == 0
    assert _default.current() is None
    offload.enqueue_task(lambda: None)
    assert offload.flush(5)
    got = samples(generate_latest(registry))
    assert got[("offload_tasks_enqueued_total", ())] == 1
    assert got[("offload_attempts_total", (("key", ""), ("outcome", "success")))] == 1


def test_opentelemetry_instruments_report_the_same(
    known_run: tuple[offload.Offloader, str],
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    off, key = known_run
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        instruments = offload.metrics.instrument(provider.get_meter("test"), off)
        assert len(instruments) == 8
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    points: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted(point.attributes.items()))
                    points[(metric.name, attrs)] = point.value
    assert points[("offload.tasks.enqueued", ())] == 4
    assert points[("offload.tasks.succeeded", ())] == 3
    assert points[("offload.tasks.dead_lettered", (("reason", "permanent"),))] == 1
    assert points[("offload.attempts", (("key", key), ("outcome", "throttled")))] == 1
    assert points[("offload.attempts", (("key", key), ("outcome", "success")))] == 3
    assert points[("offload.tasks", (("state", "queued"),))] == 0
    assert points[("offload.dead_letters", ())] == 1
    assert points[("offload.key.gate_open", (("key", key),))] == 1
