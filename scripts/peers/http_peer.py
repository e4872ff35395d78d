"""What a Python team would write instead of the shim: FastAPI, a JWT dependency, a pydantic body, and
Dramatiq's ``send`` to RabbitMQ with publisher confirms.

A copy of the shared peers' ``http_peer.py`` (``../shared/bench/peers/``), the
same endpoint; used only to measure ``POST /orders`` side by side
(``scripts/bench_http_peer.py``).  The broker comes from ``PEER_AMQP``.
"""

import os
import uuid

import dramatiq
import jwt
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

broker = RabbitmqBroker(
    url=os.environ.get("PEER_AMQP", "amqp://guest:guest@127.0.0.1:5672/peer-http"), confirm_delivery=True
)
dramatiq.set_broker(broker)
SECRET = os.environ.get("PEER_JWT_SECRET", "peer-secret-peer-secret-peer-secret!")


@dramatiq.actor(queue_name="peer_place")
def place_order(order: dict) -> None:  # consumed elsewhere; only enqueued here
    pass


class Item(BaseModel):
    product_id: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1000)


class Payment(BaseModel):
    provider: str
    payment_method: str | None = None


class PlaceOrder(BaseModel):
    items: list[Item] = Field(min_length=1, max_length=100)
    payment: Payment


def user(authorization: str = Header()) -> str:
    try:
        return jwt.decode(authorization.removeprefix("Bearer "), SECRET, algorithms=["HS256"])["sub"]
    except Exception:  # noqa: BLE001 - any bad token is a 401, as the shared peer has it
        raise HTTPException(401) from None


app = FastAPI()


@app.post("/orders", status_code=202)
def place(body: PlaceOrder, sub: str = Depends(user)) -> dict:
    order_id = str(uuid.uuid4())
    place_order.send({"order_id": order_id, "user_id": sub, **body.model_dump()})
    return {"order_id": order_id, "status": "pending"}


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}
