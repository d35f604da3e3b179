"""The console's HTML pages: what each shows, and the actions behind its buttons.

GET never changes anything. Every action is a POST (checked for its CSRF token and refused
in read-only mode by app.py before it gets here) answered with a redirect to a page that
says what was done (`?done=replayed&n=3`), so that reloading that page does nothing again.
Bulk actions on what a filter matches, and purge, go through a confirmation page (a GET)
that names the count first.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._numbers import plain_int
from ..errors import UnknownDeadLetter
from ..health_check import summary
from ..outcome import REASONS
from .filters import Filters
from .http import Request, Response

if TYPE_CHECKING:
    from .app import ConsoleApp

__all__ = ["Pages", "clip", "when"]

_DONE = {"replayed": "Replayed", "discarded": "Discarded", "purged": "Purged"}
_STATS = {
    "enqueued": "enqueued",
    "succeeded": "delivered",
    "retried": "retried",
    "dead_lettered": "dead-lettered",
    "rejected": "rejected (queue full)",
    "queued": "queued",
    "delayed": "delayed",
    "in_flight": "in flight",
    "dead_letters": "dead letters held",
    "dead_letters_dropped": "dead letters let go",
    "claimed": "claimed",
    "released": "handed back",
    "stored_ready": "ready in the store",
    "stored_delayed": "delayed in the store",
    "stored_leased": "leased in the store",
}
_MAX_SELECTED = 1_000


def when(value: datetime | None) -> str:
    """A time as the pages show it (UTC)."""
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(value: str) -> int:
    """A count in a notice's query (`n=3`); 0 for anything else."""
    return plain_int(value) or 0


class Pages:
    """The page handlers of one ConsoleApp."""

    def __init__(self, app: ConsoleApp) -> None:
        self.app = app
        self.source = app.source

    def _render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        return self.app.render(request, template, status, **context)

    def notice(self, request: Request) -> str | None:
        """What the action before this page did, from its redirect's query."""
        done = _DONE.get(request.arg("done"))
        if done is None:
            return None
        n, missing, failed = (_count(request.arg(name)) for name in ("n", "missing", "failed"))
        text = f"{done} {n:,} dead letter{'' if n == 1 else 's'}."
        if missing:
            text += f" {missing:,} had gone already."
        if failed:
            text += f" {failed:,} could not be: see the log."
        return text

    # -- pages ------------------------------------------------------------------------------

    def overview(self, request: Request, params: dict[str, str]) -> Response:
        stats = self.source.stats()
        rows = [
            (label, ("yes" if value else "no") if isinstance(value, bool) else f"{value:,}")
            for name, label in _STATS.items()
            if (value := stats.get(name)) is not None
        ]
        if "worker_running" in stats:
            rows.append(("worker running", "yes" if stats["worker_running"] else "no"))
        health = self.source.health(None, None)
        return self._render(
            request,
            "overview.html",
            title="Overview",
            nav="overview",
            stats=rows,
            keys=self.source.keys(),
            tally=self.source.tally(),
            health=health,
            summary=summary(health),
        )

    def letters(self, request: Request, params: dict[str, str]) -> Response:
        filters = Filters.read(request.arg)
        cursor = request.arg("cursor") or None
        error = filters.error
        page = None
        if error is None:
            try:
                page = self.source.page(filters.query, cursor)
            except ValueError:
                if cursor is None:
                    raise  # the store is at fault, not the request
                error, cursor = "cursor: not a page this console gave", None
        return self._render(
            request,
            "letters.html",
            400 if error else 200,
            title="Dead letters",
            nav="letters",
            error=error,
            filters=filters.given,
            active=filters.active,
            reasons=sorted(REASONS),
            page=page or _EMPTY,
            cursor=cursor,
        )

    def letter(self, request: Request, params: dict[str, str]) -> Response:
        detail = self.source.detail(params["id"])
        return self._render(
            request,
            "letter.html",
            title=detail.letter.description,
            nav="letters",
            letter=detail.letter,
            call=detail.call,
        )

    def confirm(self, request: Request, params: dict[str, str]) -> Response:
        """GET: what a bulk action would do, with the count, and the button that does it."""
        action = request.arg("action")
        if action not in ("replay", "discard"):
            return self.app.message(request, 400, "Not an action", "Replay or discard, only.")
        ids = [i for i in request.query.get("id", []) if i][:_MAX_SELECTED]
        verb = action.capitalize()
        if ids:
            count, what = len(ids), "selected"
            hidden = [("action", action), ("scope", "selected"), *(("id", i) for i in ids)]
            back = request.url("/dead-letters")
        else:
            filters = Filters.read(request.arg)
            if filters.error:
                return self.app.message(request, 400, "Bad filter", filters.error)
            count = self.source.page(filters.query, None, limit=1).total
            what = f"matching {filters.describe()}"
            hidden = [("action", action), ("scope", "matching"), *filters.given.items()]
            back = request.url("/dead-letters", filters.given)
        plural = "" if count == 1 else "s"
        question = (
            f"{verb} {count:,} dead letter{plural} ({what})?"
            if count
            else f"No dead letter is {what}: nothing to {action}."
        )
        if count and action == "replay":
            question += " Each task goes back to the queue with a fresh attempt budget."
        elif count:
            question += " They are removed for good."
        return self._render(
            request,
            "confirm.html",
            title=f"{verb} dead letters",
            nav="letters",
            heading=f"{verb} {count:,} dead letter{plural}",
            question=question,
            count=count,
            target="/act",
            hidden=hidden,
            button=f"{verb} {count:,} dead letter{plural}",
            danger=action == "discard",
            back=back,
        )

    def purge_confirm(self, request: Request, params: dict[str, str]) -> Response:
        count = self.source.tally().total
        plural = "" if count == 1 else "s"
        return self._render(
            request,
            "confirm.html",
            title="Purge",
            nav="overview",
            heading=f"Purge {count:,} dead letter{plural}",
            question=f"Remove every dead letter ({count:,}) for good?"
            if count
            else "There is no dead letter to purge.",
            count=count,
            target="/purge",
            hidden=[],
            button=f"Purge {count:,} dead letter{plural}",
            danger=True,
            back=request.url("/"),
        )

    # -- actions (POST) ---------------------------------------------------------------------

    def act_one(self, request: Request, params: dict[str, str]) -> Response:
        dead_letter_id, action = params["id"], params["action"]
        if action == "replay":
            self.source.replay(dead_letter_id)
        else:
            self.source.discard(dead_letter_id)
        done = "replayed" if action == "replay" else "discarded"
        return Response.redirect(request.url("/dead-letters", {"done": done, "n": 1}))

    def act(self, request: Request, params: dict[str, str]) -> Response:
        """POST from a confirmation page: replay or discard the selected, or every match."""
        action = request.field("action")
        if action not in ("replay", "discard"):
            return self.app.message(request, 400, "Not an action", "Replay or discard, only.")
        back: dict[str, str] = {}
        if request.field("scope") == "matching":
            filters = Filters.read(request.field)
            if filters.error:
                return self.app.message(request, 400, "Bad filter", filters.error)
            ids = self.source.matching_ids(filters.query)
        else:
            ids = [i for i in request.form.get("id", []) if i][:_MAX_SELECTED]
        do: Callable[[str], object] = (
            self.source.replay if action == "replay" else self.source.discard
        )
        done = missing = failed = 0
        for dead_letter_id in ids:
            try:
                do(dead_letter_id)
            except UnknownDeadLetter:
                missing += 1  # replayed or discarded meanwhile (another operator, a script)
            except Exception:
                self.app.log_failure(f"{action} of dead letter {dead_letter_id}")
                failed += 1
            else:
                done += 1
        verb = "replayed" if action == "replay" else "discarded"
        query = {**back, "done": verb, "n": done, "missing": missing, "failed": failed}
        return Response.redirect(request.url("/dead-letters", query))

    def purge(self, request: Request, params: dict[str, str]) -> Response:
        removed = self.source.purge()
        return Response.redirect(request.url("/", {"done": "purged", "n": removed}))


class _Empty:
    letters: list[Any] = []
    total = 0
    cursor = None


_EMPTY = _Empty()
