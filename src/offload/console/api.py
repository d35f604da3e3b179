"""The console's JSON, for scripts (`Authorization: Bearer TOKEN`, no cookie needed), its
Prometheus metrics and its health check.

    GET  api/dead-letters?key=&status=&reason=&since=&text=&cursor=&limit=
         {"items": [DeadLetter.to_json(), ...], "total": N, "cursor": "..." | null}
    GET  api/dead-letters/ID       {"dead_letter": {...}, "call": {...}}
    POST api/dead-letters/ID/replay    {"replayed": ID, "task_id": "..."}
    GET  api/stats                 Stats.to_json() (or what a store holds), with "keys"
    GET  api/health?max_age=S&max_dead_letters=N    Health.to_json(), with "summary"
    GET  metrics                   the Prometheus text exposition
    GET  healthz?max_age=S&max_dead_letters=N       200 or 503
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._numbers import plain_int
from ..health_check import summary
from ..status import Health
from .filters import Filters
from .http import Request, Response

if TYPE_CHECKING:
    from .app import ConsoleApp

__all__ = ["Api"]


class Api:
    """The JSON handlers of one ConsoleApp."""

    def __init__(self, app: ConsoleApp) -> None:
        self.app = app
        self.source = app.source

    def letters(self, request: Request, params: dict[str, str]) -> Response:
        filters = Filters.read(request.arg)
        if filters.error:
            return Response.json({"error": filters.error}, 400)
        cursor = request.arg("cursor") or None
        limit = plain_int(request.arg("limit") or "50")
        if limit is None or not 1 <= limit <= 1000:
            return Response.json({"error": "limit: an integer from 1 to 1000"}, 400)
        try:
            page = self.source.page(filters.query, cursor, limit=limit)
        except ValueError:
            if cursor is None:
                raise  # the limit was checked: the store is at fault, not the request
            return Response.json({"error": "cursor: not a page this console gave"}, 400)
        return Response.json(
            {
                "items": [letter.to_json() for letter in page.letters],
                "total": page.total,
                "cursor": page.cursor,
            }
        )

    def letter(self, request: Request, params: dict[str, str]) -> Response:
        detail = self.source.detail(params["id"])
        return Response.json(
            {"dead_letter": detail.letter.to_json(), "call": detail.call.to_json()}
        )

    def replay(self, request: Request, params: dict[str, str]) -> Response:
        task_id = self.source.replay(params["id"])
        return Response.json({"replayed": params["id"], "task_id": task_id})

    def stats(self, request: Request, params: dict[str, str]) -> Response:
        keys = self.source.keys()
        return Response.json(
            {
                "store": self.source.store_url,
                **self.source.stats(),
                "keys": None if keys is None else [key.to_json() for key in keys],
            }
        )

    def _health(self, request: Request) -> Health | Response:
        limits = []
        for name in ("max_age", "max_dead_letters"):
            text = request.arg(name)
            try:
                limits.append(None if not text else float(text) if name == "max_age" else int(text))
            except ValueError:
                return Response.json({"error": f"{name}: not a number: {text!r}"}, 400)
        max_age, max_dead_letters = limits
        try:
            return self.source.health(
                max_age, None if max_dead_letters is None else int(max_dead_letters)
            )
        except (TypeError, ValueError) as exc:
            return Response.json({"error": str(exc)}, 400)

    def health(self, request: Request, params: dict[str, str]) -> Response:
        health = self._health(request)
        if isinstance(health, Response):
            return health
        return Response.json({**health.to_json(), "summary": summary(health)})

    def healthz(self, request: Request, allowed: bool) -> Response:
        """200 when healthy, 503 when not; only a word to whom the console does not admit
        (a probe without the token learns nothing but the verdict)."""
        health = self._health(request)
        if isinstance(health, Response):
            return health
        status = 200 if health.ok else 503
        if not allowed:
            return Response.text("ok\n" if health.ok else "unhealthy\n", status)
        return Response.json({**health.to_json(), "summary": summary(health)}, status)

    def metrics(self, request: Request, params: dict[str, str]) -> Response:
        try:
            body = self.source.metrics()
        except ImportError:
            return Response.text(
                "metrics need prometheus_client: pip install 'offload[metrics]'\n", 501
            )
        return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")
