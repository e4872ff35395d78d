"""Driving the load: the :class:`Driver` sends the planned commands on their schedule (to RabbitMQ
through :class:`Bus`, to the shim through :class:`Http`), the :class:`Buyer` plays the buyers of
orders that wait for them, and the :class:`Ledger` keeps what the service accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pika
import pika.exceptions
import psycopg2

from schema.topology import COMMANDS_EXCHANGE
from scripts.fakes.paypal_certs import paypal_headers
from worker.rabbit.connection import connection_parameters
from worker.shim.auth import issue_token
from worker.shim.idempotency import derived_id
from worker.shim.webhook import sign_internal

from .config import HMAC_SECRET, ChaosConfig, ChaosError
from .plan import ABANDONED, REFUNDED_AT_THE_PROVIDER, Malformed, PlannedOrder
from .stack import Stack

PAYPAL_CERT_NAME = "chaos-signing-cert.pem"


class Ledger:
    """What was sent and accepted (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        #: inbox consumer -> message ids of commands the service accepted (broker confirm or 2xx)
        self.accepted: dict[str, set[str]] = defaultdict(set)
        self.placed: set[str] = set()  # order ids whose PlaceOrder was accepted
        self.gave_up: list[str] = []
        self.refused: Counter[str] = Counter()
        #: when (monotonic) a buyer's ``GET /orders/{id}`` was last answered 200: a read caches the order's view
        self.last_view_at: float | None = None

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.sent[what] += n

    def accept(self, consumer: str, message_id: str) -> None:
        with self.lock:
            self.accepted[consumer].add(message_id)


class Bus:
    """The script's confirmed publisher straight to RabbitMQ, as one broker user (its ``user_id`` set on every
    message unless a publish says otherwise); reconnects and repeats until confirmed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.user_id = unquote(urlsplit(url.split(",")[0]).username or "") or None
        self.conn: pika.BlockingConnection | None = None
        self.ch: Any = None
        self.reconnects = 0

    def _connect(self) -> None:
        params = connection_parameters(self.url, 60)  # every node of a cluster, in an order of this connection's
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()

    def publish(self, exchange: str, key: str, body: bytes, deadline: float, **props: Any) -> bool:
        props.setdefault("user_id", self.user_id)  # the broker checks it is this connection's user
        properties = pika.BasicProperties(delivery_mode=2, **{k: v for k, v in props.items() if v is not None})
        while True:
            try:
                if self.ch is None or not self.ch.is_open:
                    self._connect()
                self.ch.basic_publish(exchange, key, body, properties)
                return True
            except pika.exceptions.ShortStringTooLong:
                raise  # cannot be sent at all: a bug of the script
            except (pika.exceptions.AMQPError, OSError):
                self.close()
                self.reconnects += 1
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.5)

    def idle(self, seconds: float) -> None:
        if self.conn is not None and self.conn.is_open:
            try:
                self.conn.sleep(seconds)
                return
            except (pika.exceptions.AMQPError, OSError):
                self.close()
        time.sleep(seconds)


class Http:
    """Requests to the shim with the patience of a well-behaved client: 503/429/connection errors are retried."""

    def __init__(self, base: str, deadline: float) -> None:
        self.base, self.deadline = base, deadline
        self._local = threading.local()

    def client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.base, timeout=15)
        return c

    def call(self, method: str, path: str, retry_404: bool = False, **kwargs: Any) -> httpx.Response | None:
        wait = 0.3
        tries = 0
        while True:
            tries += 1
            try:
                r = self.client().request(method, path, **kwargs)
                if (
                    r.status_code < 500
                    and r.status_code != 429
                    and not (retry_404 and r.status_code == 404 and tries < 20)
                ):
                    return r
            except httpx.HTTPError:
                pass
            if time.monotonic() > self.deadline:
                return None
            time.sleep(wait)
            wait = min(wait * 1.6, 4.0)


class Driver:
    """Publishes the planned commands on their schedule: the bus inline, the shim from a thread pool."""

    def __init__(
        self,
        cfg: ChaosConfig,
        stack: Stack,
        orders: list[PlannedOrder],
        malformed: list[Malformed],
        ledger: Ledger,
        deadline: float,
    ) -> None:
        self.cfg, self.stack, self.orders, self.malformed = cfg, stack, orders, malformed
        self.ledger, self.deadline = ledger, deadline
        self.bus = Bus(stack.sender_url("shop"))  # places orders and its users' cancels
        self.buses: dict[str, Bus] = {}  # the other senders' (forged commands)
        self.http = Http(stack.shim_url, deadline)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="shim-client")
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.tokens: dict[str, str] = {}
        self.shim_settings = stack.settings().shim
        self.thread = threading.Thread(target=self._run, name="driver", daemon=True)

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = issue_token(self.shim_settings, user, "user", 6 * 3600)
        return self.tokens[user]

    def start(self) -> None:
        self.thread.start()

    def timeline(self) -> list[tuple[float, int, Callable[[], None]]]:
        rnd = random.Random(f"timeline-{self.cfg.seed}")
        looks = random.Random(f"looks-{self.cfg.seed}")  # apart, so the rest of a seed's timeline stays as it was
        items: list[tuple[float, int, Callable[[], None]]] = []

        def add(t: float, fn: Callable[[], None]) -> None:
            items.append((t, len(items), fn))

        for o in self.orders:
            t = o.at
            place_at = t
            if o.cancel == "before":
                add(t, partial(self.cancel_bus, o, 1))
                add(t + rnd.uniform(0.05, 4), partial(self.cancel_bus, o, 2))
                place_at = t + rnd.uniform(0.3, 2.0)
            if o.kind == "internal_early":
                add(t, partial(self.submit, self.confirm_internal, o, 1))
                add(t + rnd.uniform(0.1, 3), partial(self.submit, self.confirm_internal, o, 2))
                place_at = t + rnd.uniform(0.3, 2.0)
            second = place_at + rnd.uniform(0.05, 8)
            if o.channel == "shim":
                add(place_at, partial(self.submit, self.place_shim, o, 1))
                add(second, partial(self.submit, self.place_shim, o, 2))
                # the buyer's page shows the order: the read caches its view, which its later changes
                # must then write through (an order nobody reads is not cached)
                add(place_at + looks.uniform(0.5, 3), partial(self.submit, self.view_shim, o))
            else:
                add(place_at, partial(self.place_bus, o, 1))
                add(second, partial(self.place_bus, o, 2))
            if o.kind == "admin_cancel":  # the back office cancels it, paid or not: refunded if paid
                add(place_at + rnd.uniform(3, 25), partial(self.cancel_as_admin, o))
            if o.cancel == "after":
                c = place_at + rnd.uniform(0.2, 20)
                add(c, partial(self.cancel_bus, o, 1))
                add(c + rnd.uniform(0.05, 4), partial(self.cancel_bus, o, 2))
            elif o.cancel == "shim":
                c = place_at + rnd.uniform(1.0, 6)
                key = f"chaos-cancel-{o.index}"
                add(c, partial(self.submit, self.cancel_shim, o, key))
                add(c + rnd.uniform(0.05, 4), partial(self.submit, self.cancel_shim, o, key))
        for m in self.malformed:
            add(m.at, partial(self.publish_malformed, m))
        heapq.heapify(items)
        return items

    def _run(self) -> None:
        try:
            items = self.timeline()
            self.started_at = time.monotonic()
            while items:
                t, _, fn = items[0]
                lag = self.started_at + t - time.monotonic()
                if lag > 0:
                    self.bus.idle(min(lag, 0.2))
                    continue
                heapq.heappop(items)
                fn()
            self.pool.shutdown(wait=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.bus.close()
            for bus in self.buses.values():
                bus.close()
            self.done.set()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001
                self.error = self.error or exc

        self.pool.submit(run)

    # the bus

    def _publish(self, key: str, body: bytes, **props: Any) -> bool:
        ok = self.bus.publish(COMMANDS_EXCHANGE, key, body, self.deadline, content_type="application/json", **props)
        if not ok:
            self.ledger.gave_up.append(f"publish {props.get('type')} {props.get('message_id')}")
        return ok

    def place_bus(self, o: PlannedOrder, copy: int) -> None:
        body = json.dumps(o.place_body()).encode()
        if self._publish(
            "order.place", body, message_id=o.place_mid, type="PlaceOrder", correlation_id=f"chaos-{o.index}"
        ):
            self.ledger.accept("orders", o.place_mid)
            with self.ledger.lock:
                self.ledger.placed.add(o.order_id)
            self.ledger.count(f"PlaceOrder on the bus (copy {copy})")

    def cancel_mid(self, o: PlannedOrder) -> str:
        return f"chaos-{self.cfg.seed}-cancel-{o.index}"

    def cancel_bus(self, o: PlannedOrder, copy: int) -> None:
        mid = self.cancel_mid(o)
        if self._publish("order.cancel", json.dumps(o.cancel_body()).encode(), message_id=mid, type="CancelOrder"):
            self.ledger.accept("orders", mid)
            self.ledger.count(f"CancelOrder on the bus (copy {copy})")

    def sender_bus(self, role: str | None) -> Bus:
        """The bus of a sender role (the shop's for a message without ``user_id``)."""
        role = role or "shop"
        if role == "shop":
            return self.bus
        if role not in self.buses:
            self.buses[role] = Bus(self.stack.sender_url(role))
        return self.buses[role]

    def cancel_as_admin(self, o: PlannedOrder) -> None:
        """The back office cancels the order (a sender the map lets act as admin), twice as delivered."""
        mid = f"chaos-{self.cfg.seed}-admin-cancel-{o.index}"
        body = {
            "order_id": o.order_id,
            "requested_by": {"user_id": "chaos-backoffice", "roles": ["admin"]},
            "reason": "cancelled by the back office (chaos run)",
        }
        bus = self.sender_bus("backoffice")
        for copy in (1, 2):
            ok = bus.publish(
                COMMANDS_EXCHANGE,
                "order.cancel",
                json.dumps(body).encode(),
                self.deadline,
                message_id=mid,
                type="CancelOrder",
                content_type="application/json",
            )
            if not ok:
                self.ledger.gave_up.append(f"publish admin CancelOrder {mid}")
                return
            self.ledger.accept("orders", mid)
            self.ledger.count(f"CancelOrder from the back office (copy {copy})")

    def publish_malformed(self, m: Malformed) -> None:
        bus = self.sender_bus(m.sender)
        ok = bus.publish(
            COMMANDS_EXCHANGE,
            m.routing_key,
            m.body,
            self.deadline,
            message_id=m.message_id,
            type=m.message_type,
            content_type=m.content_type,
            headers={"chaos-malformed": m.index},
            user_id=bus.user_id if m.sender else None,
        )
        if ok:
            self.ledger.count(f"malformed: {m.category}")
        else:
            self.ledger.gave_up.append(f"malformed {m.index}")

    # the shim

    def place_shim(self, o: PlannedOrder, copy: int) -> None:
        body = {"order_id": o.order_id, "items": o.items, "payment": o.payment()}
        r = self.http.call(
            "POST",
            "/orders",
            json=body,
            headers={
                "Authorization": f"Bearer {self.token(o.user)}",
                "Idempotency-Key": f"chaos-{self.cfg.seed}-{o.index}",
            },
        )
        if r is None:
            self.ledger.gave_up.append(f"POST /orders {o.order_id}")
            return
        if r.status_code == 202 and r.json().get("order_id") == o.order_id:
            self.ledger.accept("orders", o.place_mid)
            with self.ledger.lock:
                self.ledger.placed.add(o.order_id)
            self.ledger.count(f"POST /orders (copy {copy})")
        else:
            self.ledger.gave_up.append(f"POST /orders {o.order_id}: {r.status_code} {r.text[:200]}")

    def view_shim(self, o: PlannedOrder) -> None:
        if o.order_id not in self.ledger.placed:  # its POST is not through yet (or gave up): nothing to show
            self.ledger.count("GET /orders/{id} skipped, not placed yet")
            return
        r = self.http.call(
            "GET", f"/orders/{o.order_id}", retry_404=True, headers={"Authorization": f"Bearer {self.token(o.user)}"}
        )
        if r is None:
            self.ledger.gave_up.append(f"GET /orders/{o.order_id}")
        else:
            self.ledger.count(f"GET /orders/{{id}} answered {r.status_code}")
            if r.status_code == 200:
                with self.ledger.lock:
                    self.ledger.last_view_at = time.monotonic()

    def cancel_shim(self, o: PlannedOrder, key: str) -> None:
        r = self.http.call(
            "PUT",
            f"/orders/{o.order_id}/cancel",
            retry_404=True,
            json={"reason": "chaos"},
            headers={"Authorization": f"Bearer {self.token(o.user)}", "Idempotency-Key": key},
        )
        if r is None:
            self.ledger.gave_up.append(f"PUT /orders/{o.order_id}/cancel")
        elif r.status_code == 202:
            secret = self.shim_settings.id_secret.get_secret_value().encode()
            mid = f"http-cancel-{derived_id(secret, 'cancel', o.user, f'{o.order_id}:{key}')}"
            self.ledger.accept("orders", mid)
            self.ledger.count("PUT /orders/{id}/cancel accepted")
        else:  # 409: no longer cancellable (or already cancelled), 404: never became visible
            self.ledger.refused[f"PUT cancel {r.status_code}"] += 1
            self.ledger.count(f"PUT /orders/{{id}}/cancel answered {r.status_code}")

    def confirm_internal(self, o: PlannedOrder, copy: int) -> None:
        """PaymentConfirmed from the internal payment service (HMAC-signed), before the PlaceOrder."""
        event_id = f"chaos-{self.cfg.seed}-intpay-{o.index}"
        body = json.dumps(
            {
                "order_id": o.order_id,
                "provider": "internal",
                "payment_id": f"int-{o.index}",
                "amount": o.total,
                "currency": "USD",
                "event_id": event_id,
            }
        ).encode()
        r = self.http.call(
            "POST",
            "/orders/payment-confirmation",
            content=body,
            headers={"X-Orders-Signature": sign_internal(HMAC_SECRET, body), "Content-Type": "application/json"},
        )
        if r is not None and r.status_code == 200 and r.json().get("enqueued"):
            self.ledger.accept("orders", event_id)
            self.ledger.count(f"internal PaymentConfirmed before PlaceOrder (copy {copy})")
        else:
            self.ledger.gave_up.append(f"internal confirmation {o.order_id}: {r.status_code if r else 'no answer'}")


class PayPalSigner:
    """Signs PayPal webhooks with a certificate from the run's PayPal CA, served over https by the PayPal fake."""

    def __init__(self, stack: Stack, webhook_id: str) -> None:
        self.issued = stack.paypal_pki.signing_cert()
        httpx.put(
            f"{stack.fake_urls['paypal']}/_fake/certs/{PAYPAL_CERT_NAME}", content=self.issued.cert_pem, timeout=5
        ).raise_for_status()
        self.cert_url = f"{stack.paypal_cert_base}/{PAYPAL_CERT_NAME}"
        self.webhook_id = webhook_id

    def headers(self, body: bytes) -> dict[str, str]:
        return {**paypal_headers(self.issued, body, self.webhook_id, self.cert_url), "Content-Type": "application/json"}


def stripe_signature(payload: bytes, secret: str) -> str:
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class Buyer:
    """Plays the buyers of orders that wait for them: 3-D Secure at Stripe, approval at PayPal.

    Watches PostgreSQL for orders ``awaiting_payment``, acts at the fake (as
    the buyer's browser would), then delivers the provider's signed webhook
    to the shim three times.
    """

    def __init__(
        self, cfg: ChaosConfig, stack: Stack, orders: dict[str, PlannedOrder], ledger: Ledger, deadline: float
    ) -> None:
        self.cfg, self.stack, self.orders, self.ledger = cfg, stack, orders, ledger
        self.http = Http(stack.shim_url, deadline)
        self.settings = stack.settings()
        self.signer = PayPalSigner(stack, self.settings.paypal.webhook_id)
        self.handled: dict[str, str] = {}  # order id -> what the buyer did
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="buyer")
        # buyers paying in the instant of the deadline wait minutes for it: on threads of their own, or the
        # four above are theirs and every other buyer waits behind them until its order expires (the first
        # 10,000-order run with them: 2,300 orders expired whose buyers meant to pay at once)
        self.late_pool = ThreadPoolExecutor(256, thread_name_prefix="late-buyer")
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.deliveries: Counter[str] = Counter()
        self.deadline = deadline
        self._local = threading.local()
        self._buses: list[Bus] = []
        self.thread = threading.Thread(target=self._run, name="buyer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.pool.shutdown(wait=True)
        self.late_pool.shutdown(wait=True)
        for bus in self._buses:
            bus.close()

    def _cancel_now(self, plan: PlannedOrder | None, copy: int) -> None:
        """The owner cancels while the payment is being confirmed (``cancel == "race"``)."""
        if plan is None or plan.cancel != "race":
            return
        bus = getattr(self._local, "bus", None)
        if bus is None:
            bus = self._local.bus = Bus(self.stack.sender_url("shop"))
            with self.lock:
                self._buses.append(bus)
        mid = f"chaos-{self.cfg.seed}-cancel-{plan.index}"
        if bus.publish(
            COMMANDS_EXCHANGE,
            "order.cancel",
            json.dumps(plan.cancel_body()).encode(),
            self.deadline,
            message_id=mid,
            type="CancelOrder",
            content_type="application/json",
        ):
            self.ledger.accept("orders", mid)
            self.ledger.count(f"CancelOrder racing the payment (copy {copy})")
        else:
            self.ledger.gave_up.append(f"publish CancelOrder {mid}")

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.pending

    def _run(self) -> None:
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.stack.direct_dsn(), connect_timeout=3, application_name="chaos-buyer")
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT o.order_id::text, o.payment_provider, p.provider_payment_id,"
                        " extract(epoch FROM o.awaiting_since)::float8 FROM orders o"
                        " JOIN payments p USING (order_id) WHERE o.status = 'awaiting_payment'"
                        " AND p.status = 'requires_action' AND p.provider_payment_id IS NOT NULL"
                    )
                    rows = cur.fetchall()
            except psycopg2.Error:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self.stop_event.wait(1.0)
                continue
            for order_id, provider, pid, since in rows:
                plan = self.orders.get(order_id)
                if plan is not None and plan.kind in ABANDONED:
                    continue  # this buyer never pays: the order waits until it expires
                with self.lock:
                    if order_id in self.handled or order_id in self.pending:
                        continue
                    self.pending.add(order_id)
                late = plan is not None and plan.kind == "late_payer"
                (self.late_pool if late else self.pool).submit(self._act_safely, order_id, provider, pid, since)
            self.stop_event.wait(0.5)
        if conn is not None:
            conn.close()

    def _act_safely(self, order_id: str, provider: str, pid: str, since: float | None = None) -> None:
        try:
            plan = self.orders.get(order_id)
            if plan is not None and plan.kind == "late_payer" and since is not None:
                # pays in the instant of the deadline, a little before or after: the row lock decides
                deadline = since + self.cfg.payment_timeout_minutes * 60
                jitter = random.Random(f"late-{self.cfg.seed}-{plan.index}").uniform(-1.5, 1.5)
                self.stop_event.wait(max(0.0, deadline + jitter - time.time()))
            what = self._pay_stripe(order_id, pid) if provider == "stripe" else self._pay_paypal(order_id, pid)
        except Exception as exc:  # noqa: BLE001
            self.error = self.error or exc
            what = f"error: {exc!r}"
        with self.lock:
            self.handled[order_id] = what
            self.pending.discard(order_id)

    def _deliver(
        self, body: bytes, headers: Callable[[], dict[str, str]], kind: str, plan: PlannedOrder | None = None
    ) -> bool:
        ok = True
        for copy in (1, 2, 3):  # the provider delivers the same event three times
            if copy < 3:
                self._cancel_now(plan, copy)
            r = self.http.call("POST", "/orders/payment-confirmation", content=body, headers=headers())
            if r is None or r.status_code != 200:
                self.ledger.gave_up.append(
                    f"{kind} webhook: {r.status_code if r else 'no answer'} {r.text[:200] if r else ''}"
                )
                ok = False
                continue
            self.deliveries[kind] += 1
        return ok

    def _pay_stripe(self, order_id: str, pi: str) -> str:
        plan = self.orders.get(order_id)
        fail = plan is not None and plan.kind == "3ds_fail"
        r = httpx.post(
            f"{self.stack.fake_urls['stripe']}/_fake/confirm/{pi}",
            json={"outcome": "failed" if fail else "succeeded"},
            timeout=10,
        )
        if r.status_code == 409 and plan is not None and plan.kind == "late_payer":
            return "too late: the expiry cancelled the PaymentIntent first"
        if r.status_code != 200:
            return f"confirm at the fake answered {r.status_code}"
        intent = r.json()
        index = plan.index if plan else abs(hash(order_id))
        event_type = "payment_intent.payment_failed" if fail else "payment_intent.succeeded"
        event_id = f"evt_chaos{self.cfg.seed}_{index}"
        payload = json.dumps(
            {
                "id": event_id,
                "object": "event",
                "api_version": "2024-06-20",
                "created": int(time.time()),
                "livemode": False,
                "type": event_type,
                "data": {"object": intent},
            }
        ).encode()
        secret = self.settings.stripe.webhook_secret.get_secret_value()
        if self._deliver(
            payload,
            lambda: {"Stripe-Signature": stripe_signature(payload, secret), "Content-Type": "application/json"},
            "stripe",
            plan,
        ):
            self.ledger.accept("payments" if fail else "orders", event_id)
        return f"3-D Secure {'failed' if fail else 'passed'}, webhook ×3"

    def _pay_paypal(self, order_id: str, paypal_order: str) -> str:
        plan = self.orders.get(order_id)
        decline = plan is not None and plan.kind == "paypal_decline"
        r = httpx.post(
            f"{self.stack.fake_urls['paypal']}/_fake/approve/{paypal_order}",
            json={"decline": "capture"} if decline else {},
            timeout=10,
        )
        if r.status_code != 200:
            return f"approve at the fake answered {r.status_code}"
        order = r.json()
        unit = order["purchase_units"][0]
        index = plan.index if plan else abs(hash(order_id))
        event_id = f"WH-CHAOS{self.cfg.seed}-{index}"
        payload = json.dumps(
            {
                "id": event_id,
                "event_version": "1.0",
                "create_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "resource_type": "checkout-order",
                "event_type": "CHECKOUT.ORDER.APPROVED",
                "summary": "An order has been approved by buyer",
                "resource": {
                    "id": paypal_order,
                    "status": "APPROVED",
                    "intent": "CAPTURE",
                    "purchase_units": [
                        {
                            "reference_id": unit.get("reference_id", "default"),
                            "custom_id": unit.get("custom_id"),
                            "amount": unit["amount"],
                        }
                    ],
                },
            }
        ).encode()
        if self._deliver(payload, lambda: self.signer.headers(payload), "paypal", plan):
            self.ledger.accept("payments", event_id)
        return f"approved{' (capture to be declined)' if decline else ''}, webhook ×3"


class Clerk:
    """A shop's clerk who refunds paid orders in the provider's dashboard (Stripe), in full or a third of them.

    Watches PostgreSQL for the orders of :data:`REFUNDED_AT_THE_PROVIDER` that completed, refunds them at the
    Stripe fake's dashboard page (as a person would), then delivers Stripe's signed ``charge.refunded`` to the
    shim three times (the run's fakes send no webhooks themselves: the script delivers them, as for payments).
    """

    def __init__(
        self, cfg: ChaosConfig, stack: Stack, orders: dict[str, PlannedOrder], ledger: Ledger, deadline: float
    ) -> None:
        self.cfg, self.stack, self.ledger, self.deadline = cfg, stack, ledger, deadline
        self.orders = {oid: o for oid, o in orders.items() if o.kind in REFUNDED_AT_THE_PROVIDER}
        self.http = Http(stack.shim_url, deadline)
        self.secret = stack.settings().stripe.webhook_secret.get_secret_value()
        self.done: dict[str, str] = {}  # order id -> what the clerk did
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="clerk", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)

    @property
    def idle(self) -> bool:
        """Every order it is to refund is refunded (or can no longer be: it did not complete)."""
        with self.lock:
            return len(self.done) >= len(self.orders)

    def _run(self) -> None:
        conn = None
        while not self.stop_event.is_set() and not self.idle:
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.stack.direct_dsn(), connect_timeout=3, application_name="chaos-clerk")
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT o.order_id::text, o.status, p.provider_payment_id FROM orders o"
                        " LEFT JOIN payments p USING (order_id) WHERE o.order_id = ANY(CAST(%s AS uuid[]))",
                        (list(set(self.orders) - set(self.done)),),
                    )
                    rows = cur.fetchall()
            except psycopg2.Error:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self.stop_event.wait(1.0)
                continue
            for order_id, status, pid in rows:
                if status == "completed" and pid:
                    try:
                        what = self._refund(self.orders[order_id], pid)
                    except Exception as exc:  # noqa: BLE001 - reported by the main thread
                        self.error = self.error or exc
                        what = f"error: {exc!r}"
                elif status in ("rejected", "cancelled"):
                    what = f"not refunded: the order ended {status}"
                else:
                    continue
                with self.lock:
                    self.done[order_id] = what
            self.stop_event.wait(1.0)
        if conn is not None:
            conn.close()

    def _api(self, url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """A read of the Stripe fake's API, as the clerk's tools would retry it (the run injects faults there)."""
        wait = 0.3
        while True:
            try:
                r = httpx.get(url, params=params, auth=("sk_test_local_fake", ""), timeout=10)
                if r.status_code == 200:
                    return dict(r.json())
            except httpx.HTTPError:
                pass
            if time.monotonic() > self.deadline:
                raise ChaosError(f"the Stripe fake did not answer {url}")
            time.sleep(wait)
            wait = min(wait * 1.6, 4.0)

    def _refund(self, plan: PlannedOrder, pi: str) -> str:
        base = self.stack.fake_urls["stripe"]
        amount = None if plan.kind == "refund_full" else max(1, plan.total // 3)
        r = httpx.post(f"{base}/_fake/refund/{pi}", data={"amount": str(amount)} if amount else {}, timeout=10)
        if r.status_code != 200:
            return f"the dashboard answered {r.status_code}: {r.text[:200]}"
        intent = self._api(f"{base}/v1/payment_intents/{pi}")
        refunds = self._api(f"{base}/v1/refunds", {"payment_intent": pi})["data"]
        refunded = sum(x["amount"] for x in refunds if x["status"] in ("succeeded", "pending"))
        charge = {
            "id": intent["latest_charge"],
            "object": "charge",
            "amount": intent["amount_received"],
            "amount_captured": intent["amount_received"],
            "amount_refunded": refunded,
            "refunded": refunded >= intent["amount_received"],
            "currency": intent["currency"],
            "payment_intent": pi,
            "metadata": {},
            "status": "succeeded",
        }
        event_id = f"evt_chaos{self.cfg.seed}_refund_{plan.index}"
        payload = json.dumps(
            {
                "id": event_id,
                "object": "event",
                "api_version": "2024-06-20",
                "created": int(time.time()),
                "livemode": False,
                "type": "charge.refunded",
                "data": {"object": charge},
            }
        ).encode()
        delivered = 0
        for _ in (1, 2, 3):  # Stripe delivers the same event more than once
            r2 = self.http.call(
                "POST",
                "/orders/payment-confirmation",
                content=payload,
                headers={
                    "Stripe-Signature": stripe_signature(payload, self.secret),
                    "Content-Type": "application/json",
                },
            )
            if r2 is None or r2.status_code != 200:
                self.ledger.gave_up.append(f"charge.refunded webhook: {r2.status_code if r2 else 'no answer'}")
                continue
            delivered += 1
        if delivered:
            self.ledger.accept("payments", event_id)
            self.ledger.count(f"refunds at the provider ({'full' if amount is None else 'partial'})")
        return f"refunded {'in full' if amount is None else amount} at the dashboard, charge.refunded ×{delivered}"
