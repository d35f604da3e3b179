"""Metrics: an offloader's counters and state for Prometheus, or through OpenTelemetry.

    offload.metrics.register()                 # prometheus_client's default registry
    offload.metrics.register(registry, off)    # a registry and an Offloader of your own
    offload.metrics.instrument()               # OpenTelemetry: observable instruments

Prometheus (`pip install 'offload[metrics]'`): a custom collector, read at each scrape:

    offload_tasks_enqueued_total                   tasks accepted
    offload_tasks_succeeded_total                  tasks delivered
    offload_tasks_dead_lettered_total{reason}      exhausted, permanent, shutdown
    offload_attempts_total{key,outcome}            success, throttled, transient, permanent
    offload_tasks{state}                           queued, delayed, in_flight (this process)
    offload_store_tasks{state}                     ready, delayed, leased (a durable store)
    offload_dead_letters                           held in the store now
    offload_key_gate_open{key}                     0 while the key's gate is closed, else 1
    offload_key_rate{key}                          calls a second a paced key may start

Counters are this process's since its offloader was made; `key` is "" for a plain callable
without one. OpenTelemetry (`pip install 'offload[otel]'`): the same figures as observable
instruments named with dots (`offload.tasks.enqueued`, `offload.attempts`, ...), read when
the SDK's reader collects. Without an offloader given, both read the module-level default
offloader if one was made (and never make one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _default

if TYPE_CHECKING:
    from .offloader import Offloader
    from .stores.base import Store

__all__ = ["Snapshot", "instrument", "register", "snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every figure the metrics report, read at one moment (see the module docstring)."""

    enqueued: int = 0
    succeeded: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)  # reason -> tasks
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)  # (key, outcome) -> n
    tasks: dict[str, int] = field(default_factory=dict)  # queued, delayed, in_flight
    store_tasks: dict[str, int] | None = None  # ready, delayed, leased
    dead_letters: int | None = None
    gate_open: dict[str, int] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)


def snapshot(offloader: Offloader | None = None, store: Store | None = None) -> Snapshot:
    """The figures of `offloader` (the default one if None and one was made), or of a
    `store` alone (what a store holds; no process counters)."""
    if offloader is None and store is None:
        offloader = _default.current()
    if offloader is None:
        if store is None:
            return Snapshot()
        return _store_snapshot(store)
    core = offloader._core
    with core.lock:
        ledger = core.ledger
        attempts: dict[tuple[str, str], int] = {
            (key or "", kind): n for (key, kind), n in ledger.attempts.items()
        }
        by_reason = dict(ledger.by_reason)
        enqueued, succeeded = ledger.enqueued, ledger.succeeded
    stats = offloader.stats()
    keys = offloader.keys()
    stored = None
    if stats.stored_ready is not None:
        stored = {
            "ready": stats.stored_ready,
            "delayed": stats.stored_delayed or 0,
            "leased": stats.stored_leased or 0,
        }
    return Snapshot(
        enqueued=enqueued,
        succeeded=succeeded,
        dead_lettered={reason: by_reason.get(reason, 0) for reason in _REASONS} | by_reason,
        attempts=attempts,
        tasks={"queued": stats.queued, "delayed": stats.delayed, "in_flight": stats.in_flight},
        store_tasks=stored,
        dead_letters=stats.dead_letters,
        gate_open={key: int(state.reopens_in is None) for key, state in keys.items()},
        rate={key: state.rate for key, state in keys.items() if state.rate is not None},
    )


_REASONS = ("exhausted", "permanent", "shutdown")


def _store_snapshot(store: Store) -> Snapshot:
    if not store.durable:
        return Snapshot(dead_letters=len(store))
    counts = store.counts()  # type: ignore[attr-defined]
    return Snapshot(
        store_tasks={"ready": counts.ready, "delayed": counts.delayed, "leased": counts.leased},
        dead_letters=counts.dead_letters,
    )


# -- Prometheus -----------------------------------------------------------------------------


class OffloadCollector:
    """A prometheus_client collector of an offloader's (or a store's) figures."""

    def __init__(self, offloader: Offloader | None = None, store: Store | None = None) -> None:
        self.offloader = offloader
        self.store = store

    def describe(self) -> list[Any]:
        return []  # the metrics depend on the keys seen: no fixed description

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - an optional extra
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        shot = snapshot(self.offloader, self.store)
        if self.offloader is not None or self.store is None:
            yield CounterMetricFamily(
                "offload_tasks_enqueued", "Tasks accepted by enqueue_task.", value=shot.enqueued
            )
            yield CounterMetricFamily(
                "offload_tasks_succeeded", "Tasks delivered.", value=shot.succeeded
            )
            lettered = CounterMetricFamily(
                "offload_tasks_dead_lettered", "Tasks that became dead letters.", labels=["reason"]
            )
            for reason, n in sorted(shot.dead_lettered.items()):
                lettered.add_metric([reason], n)
            yield lettered
            attempts = CounterMetricFamily(
                "offload_attempts",
                "Attempts made, by throttle key and how they ended.",
                labels=["key", "outcome"],
            )
            for (key, outcome), n in sorted(shot.attempts.items()):
                attempts.add_metric([key, outcome], n)
            yield attempts
            tasks = GaugeMetricFamily(
                "offload_tasks", "Tasks this process holds, by state.", labels=["state"]
            )
            for state, n in shot.tasks.items():
                tasks.add_metric([state], n)
            yield tasks
        if shot.store_tasks is not None:
            stored = GaugeMetricFamily(
                "offload_store_tasks", "Tasks a durable store holds, by state.", labels=["state"]
            )
            for state, n in shot.store_tasks.items():
                stored.add_metric([state], n)
            yield stored
        if shot.dead_letters is not None:
            yield GaugeMetricFamily(
                "offload_dead_letters", "Dead letters held in the store.", value=shot.dead_letters
            )
        gates = GaugeMetricFamily(
            "offload_key_gate_open", "1 while a key's gate is open, 0 while closed.", labels=["key"]
        )
        for key, is_open in sorted(shot.gate_open.items()):
            gates.add_metric([key], is_open)
        yield gates
        rates = GaugeMetricFamily(
            "offload_key_rate", "Calls a second a paced key may start now.", labels=["key"]
        )
        for key, rate in sorted(shot.rate.items()):
            rates.add_metric([key], rate)
        yield rates


def register(registry: Any = None, offloader: Offloader | None = None) -> OffloadCollector:
    """Add a collector of `offloader`'s figures (the default offloader's if None) to
    `registry` (prometheus_client's default REGISTRY if None); returns the collector."""
    try:
        import prometheus_client  # noqa: PLC0415 - an optional extra
    except ImportError:
        raise ImportError(
            "offload.metrics.register needs prometheus_client: pip install 'offload[metrics]'"
        ) from None
    collector = OffloadCollector(offloader)
    (registry if registry is not None else prometheus_client.REGISTRY).register(collector)
    return collector


def exposition(offloader: Offloader | None = None, store: Store | None = None) -> bytes:
    """The Prometheus text exposition of one offloader's (or store's) figures alone."""
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    registry.register(OffloadCollector(offloader, store))
    return generate_latest(registry)


# -- OpenTelemetry --------------------------------------------------------------------------


class _Shots:
    """One snapshot shared by the instruments read in one collection (they are read one
    after another, each through its own callback)."""

    def __init__(self, offloader: Offloader | None, ttl: float = 0.5) -> None:
        self.offloader = offloader
        self.ttl = ttl
        self._lock = threading.Lock()
        self._taken = -1e18
        self._shot = Snapshot()

    def get(self) -> Snapshot:
        with self._lock:
            now = time.monotonic()
            if now - self._taken > self.ttl:
                self._shot, self._taken = snapshot(self.offloader), now
            return self._shot


def instrument(meter: Any = None, offloader: Offloader | None = None) -> list[Any]:
    """Observable OpenTelemetry instruments of `offloader`'s figures (the default
    offloader's if None) on `meter` (`get_meter("offload")` if None); returns them."""
    try:
        from opentelemetry.metrics import Observation, get_meter  # noqa: PLC0415
    except ImportError:
        raise ImportError(
            "offload.metrics.instrument needs opentelemetry-api: pip install 'offload[otel]'"
        ) from None
    from . import __version__  # noqa: PLC0415

    meter = meter if meter is not None else get_meter("offload", __version__)
    shots = _Shots(offloader)

    def observe(read: Callable[[Snapshot], list[tuple[float, dict[str, str]]]]) -> Any:
        def callback(options: Any) -> list[Any]:
            return [Observation(value, attributes) for value, attributes in read(shots.get())]

        return [callback]

    return [
        meter.create_observable_counter(
            "offload.tasks.enqueued",
            observe(lambda s: [(s.enqueued, {})]),
            unit="{task}",
            description="Tasks accepted by enqueue_task.",
        ),
        meter.create_observable_counter(
            "offload.tasks.succeeded",
            observe(lambda s: [(s.succeeded, {})]),
            unit="{task}",
            description="Tasks delivered.",
        ),
        meter.create_observable_counter(
            "offload.tasks.dead_lettered",
            observe(lambda s: [(n, {"reason": r}) for r, n in s.dead_lettered.items()]),
            unit="{task}",
            description="Tasks that became dead letters.",
        ),
        meter.create_observable_counter(
            "offload.attempts",
            observe(lambda s: [(n, {"key": k, "outcome": o}) for (k, o), n in s.attempts.items()]),
            unit="{attempt}",
            description="Attempts made, by throttle key and how they ended.",
        ),
        meter.create_observable_gauge(
            "offload.tasks",
            observe(lambda s: [(n, {"state": state}) for state, n in s.tasks.items()]),
            unit="{task}",
            description="Tasks this process holds, by state.",
        ),
        meter.create_observable_gauge(
            "offload.dead_letters",
            observe(lambda s: [] if s.dead_letters is None else [(s.dead_letters, {})]),
            unit="{task}",
            description="Dead letters held in the store.",
        ),
        meter.create_observable_gauge(
            "offload.key.gate_open",
            observe(lambda s: [(v, {"key": k}) for k, v in s.gate_open.items()]),
            description="1 while a key's gate is open, 0 while closed.",
        ),
        meter.create_observable_gauge(
            "offload.key.rate",
            observe(lambda s: [(v, {"key": k}) for k, v in s.rate.items()]),
            unit="{call}/s",
            description="Calls a second a paced key may start now.",
        ),
    ]
