"""FastAPI: an order endpoint hands the warehouse webhook to offload and answers 202.

    python examples/fastapi_app.py                   # a self-contained run (stand-in warehouse)
    WAREHOUSE_URL=http://127.0.0.1:9000 uvicorn --app-dir examples fastapi_app:app

`offload.enqueue_task` never blocks and takes microseconds, so an `async def` endpoint
may call it directly: nothing waits on the event loop. The worker is a thread, not a task
on the loop, so a slow warehouse cannot stall other requests either.

Shut offload down in the lifespan: uvicorn ends its process on SIGTERM by raising the
signal again once it has shut down, so Python's exit hooks (offload's among them) never
run, and whatever is still queued would be lost without a word.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import offload
import offload.web

WAREHOUSE_URL = os.environ.get("WAREHOUSE_URL", "http://127.0.0.1:9000")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # The server is stopping: deliver what is queued within a deadline, off the event loop,
    # and say what is left. (uvicorn's exit skips offload's exit hook: this is the only
    # shutdown there is.)
    await asyncio.to_thread(offload.shutdown, 10)


app = FastAPI(lifespan=lifespan)
# offload's worker starts on a request's calls once its response is sent, so that it does
# not take the GIL from the event loop while the answer is still being written.
app.add_middleware(offload.web.ASGIMiddleware)


class Order(BaseModel):
    id: str
    sku: str
    quantity: int


@app.post("/orders", status_code=202)
async def create_order(order: Order) -> dict[str, str]:
    # ... store the order in your own database here ...
    try:
        task = offload.enqueue_task(
            offload.http(
                "POST",
                f"{WAREHOUSE_URL}/shipments",
                json=order.model_dump(),
                idempotency_key=f"order-{order.id}",  # the same key on every retry
            )
        )
    except offload.QueueFull:
        raise HTTPException(503, "the warehouse is unreachable; try again shortly") from None
    return {"order": order.id, "task": task.id}


if __name__ == "__main__":
    from _local_api import LocalAPI
    from fastapi.testclient import TestClient

    with LocalAPI() as warehouse:
        WAREHOUSE_URL = warehouse.url
        with TestClient(app) as client:  # runs the lifespan: flush on the way out
            for n in (1, 2, 3):
                response = client.post("/orders", json={"id": f"A{n}", "sku": "tea", "quantity": n})
                print(response.status_code, response.json()["order"])
        for received in warehouse.received:
            print(
                "warehouse received",
                received.path,
                received.json(),
                "Idempotency-Key:",
                received.headers["idempotency-key"],
            )
