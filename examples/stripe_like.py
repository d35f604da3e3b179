"""A POST with an idempotency key: charge a card exactly once, even when a retry is needed.

    python examples/stripe_like.py                   # a self-contained run (stand-in API)

The stand-in payments API behaves as Stripe documents: it demands an `Idempotency-Key`,
and a request that repeats a key gets the first answer again instead of a second charge.
Here it also loses the answer to every first attempt (502 after the charge was made),
the case the key exists for: offload retries, the API sees the same key, nobody pays twice.
A declined card (402) is permanent: it becomes a dead letter at once, with no secret in it.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import offload

if TYPE_CHECKING:
    from _local_api import Answer, Request

API_KEY = os.environ.get("PAYMENTS_API_KEY", "sk_test_example")


def charge(api_url: str, order_id: str, amount: int, source: str) -> offload.Task:
    """Queue a charge; the key is the order id, so a replayed dead letter or a second
    click on "pay" cannot charge twice either."""
    return offload.enqueue_task(
        offload.http(
            "POST",
            f"{api_url}/v1/charges",
            data={"amount": amount, "currency": "eur", "source": source},
            headers={"Authorization": f"Bearer {API_KEY}"},
            idempotency_key=f"charge-{order_id}",
        )
    )


class FakePayments:
    """The stand-in payments API (for `_local_api.LocalAPI`); `charges` by idempotency key."""

    def __init__(self) -> None:
        self.charges: dict[str, dict[str, object]] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Answer:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return 401, {}, {"error": "invalid api key"}
        key = request.headers.get("idempotency-key")
        if not key:
            return 400, {}, {"error": "an Idempotency-Key header is required"}
        form = request.form()
        if form.get("source") == "tok_chargeDeclined":
            return 402, {}, {"error": {"code": "card_declined"}}
        with self._lock:
            if key in self.charges:  # a retry: the first answer again, no second charge
                return 200, {"Idempotent-Replayed": "true"}, self.charges[key]
            self.charges[key] = {"id": f"ch_{len(self.charges) + 1}", "amount": int(form["amount"])}
        return 502, {}, {"error": "bad gateway"}  # the charge was made; the answer is lost


if __name__ == "__main__":
    from _local_api import LocalAPI

    payments = FakePayments()
    with LocalAPI(payments) as api:
        charge(api.url, "1001", 2000, "tok_visa")
        charge(api.url, "1002", 4500, "tok_mastercard")
        charge(api.url, "1003", 990, "tok_chargeDeclined")
        offload.flush(timeout=30)
        print(f"requests received: {len(api.received)}, charges made: {len(payments.charges)}")
        for key, made in sorted(payments.charges.items()):
            print(f"  {key}: {made}")
        for letter in offload.dead_letters():
            print(f"dead letter: {letter.description} [{letter.reason}] {letter.error}")
