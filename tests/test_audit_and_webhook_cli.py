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
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


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
    saved.write_text(json.dumps({"headers": {"Stripe-Signature": header}, "body": body.replace("succeeded", "failed", 1)}))
    done = orders_cli(["webhook", "replay", str(saved)], test_env)
    assert done.returncode == 1 and "WebhookVerificationError" in done.stderr
