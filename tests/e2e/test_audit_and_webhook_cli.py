"""``orders audit`` finds what the guarantees forbid; ``orders webhook replay`` verifies saved deliveries."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import stripe
from sqlalchemy import text

ORDERS = str(Path(sys.executable).parent / "orders")
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


def orders_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORDERS, *args], env=env, capture_output=True, text=True, timeout=120)


def test_audit_passes_on_a_clean_run_and_names_each_violation(service, bus, clean_db, wait, make_place, test_env):
    service("worker", "--processes", "1")
    service("relay")
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for oid in ids:
        bus.publish("PlaceOrder", make_place(order_id=oid))

    def all_completed() -> bool:
        with clean_db.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM orders WHERE status = 'completed'")).scalar() == 5

    wait(all_completed, what="orders paid through the fake")
    wait(lambda: orders_cli(["audit", "--json", "--stuck-minutes", "0"], test_env).returncode == 0, timeout=20)
    with clean_db.begin() as conn:  # what no code path may do: a status without its history, a wrong amount
        conn.execute(text("UPDATE orders SET status = 'cancelled' WHERE order_id = CAST(:o AS uuid)"), {"o": ids[0]})
        conn.execute(text("UPDATE payments SET amount = amount + 1 WHERE order_id = CAST(:o AS uuid)"), {"o": ids[1]})
    done = orders_cli(["audit", "--json"], test_env)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    found = {f["check"]: f for f in report["findings"]}
    assert found["state-matches-history"]["sample"][0]["order_id"] == ids[0]
    assert found["payment-matches-order"]["sample"][0]["order_id"] == ids[1]
    assert "transitions-allowed" not in found


def test_webhook_replay_verifies_a_saved_stripe_delivery_and_rejects_a_tampered_one(test_env, settings, tmp_path):
    event = json.loads((FIXTURES / "stripe" / "event.json").read_text())
    intent = json.loads((FIXTURES / "stripe" / "payment_intent.json").read_text())
    intent.update(status="succeeded", metadata={"order_id": str(uuid.uuid4())})
    event.update(id="evt_replayed_1", type="payment_intent.succeeded", data={"object": intent})
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, settings.stripe.webhook_secret.get_secret_value())
    saved = tmp_path / "delivery.json"
    saved.write_text(json.dumps({"headers": {"Stripe-Signature": header}, "body": body}))
    done = orders_cli(["webhook", "replay", str(saved)], test_env)
    assert done.returncode == 0, done.stderr
    command = json.loads(done.stdout)["command"]
    assert command["message_type"] == "PaymentConfirmed" and command["message_id"] == "evt_replayed_1"
    saved.write_text(
        json.dumps({"headers": {"Stripe-Signature": header}, "body": body.replace("succeeded", "failed", 1)})
    )
    done = orders_cli(["webhook", "replay", str(saved)], test_env)
    assert done.returncode == 1 and "WebhookVerificationError" in done.stderr


def _order_with_payment(conn, status: str, history: list[str], payment_status: str) -> str:
    """An order written straight into the tables (a state no code path should leave), with its history."""
    order_id = str(uuid.uuid4())
    conn.execute(
        text(
            "INSERT INTO orders (order_id, user_id, status, currency, total, payment_provider, payment_request,"
            " place_message_id) VALUES (CAST(:o AS uuid), 'u1', :s, 'USD', 1200, 'stripe', '{}', :o)"
        ),
        {"o": order_id, "s": status},
    )
    for before, after in zip([None, *history], history):
        conn.execute(
            text(
                "INSERT INTO order_transitions (order_id, from_status, to_status, message_id)"
                " VALUES (CAST(:o AS uuid), :f, :t, :m)"
            ),
            {"o": order_id, "f": before, "t": after, "m": f"m-{after}"},
        )
    conn.execute(
        text(
            "INSERT INTO payments (order_id, provider, status, amount, currency, idempotency_key, provider_payment_id,"
            " refund_id) VALUES (CAST(:o AS uuid), 'stripe', :s, 1200, 'USD', :o, 'pi_1', 're_1')"
        ),
        {"o": order_id, "s": payment_status},
    )
    return order_id


def test_audit_finds_money_returned_on_an_order_that_does_not_show_it(clean_db):
    from worker.audit import run_audit

    with clean_db.begin() as conn:
        hidden = _order_with_payment(conn, "completed", ["pending", "completed"], "refunded")
        shown = _order_with_payment(conn, "refunded", ["pending", "completed", "refunded"], "refunded")
        ended = _order_with_payment(conn, "cancelled", ["pending", "cancelled"], "refunded")
        claimed = _order_with_payment(conn, "refunded", ["pending", "completed", "refunded"], "succeeded")
    found = {f.check: f for f in run_audit(clean_db, stuck_minutes=60)}
    assert [r["order_id"] for r in found["money-returned-shows"].sample] == [hidden]
    assert [r["order_id"] for r in found["refunded-orders-were-refunded"].sample] == [claimed]
    flagged = {r["order_id"] for f in found.values() for r in f.sample}
    assert shown not in flagged and ended not in flagged
