"""The FastAPI example's endpoint without its lifespan: what a user who relies on offload's
exit hook under uvicorn has (tests/system/test_examples.py shows what it loses)."""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel

import offload

WAREHOUSE_URL = os.environ["WAREHOUSE_URL"]
app = FastAPI()


class Order(BaseModel):
    id: str
    sku: str
    quantity: int


@app.post("/orders", status_code=202)
async def create_order(order: Order) -> dict[str, str]:
    offload.enqueue_task(
        offload.http("POST", f"{WAREHOUSE_URL}/shipments", json=order.model_dump())
    )
    return {"order": order.id}
