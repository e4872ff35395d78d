"""``scripts/check_docs.py``: a doc that names only what exists passes; each kind of broken name fails.

The names come from the code as it is (the CLI, the settings, the topology, the shim's routes), so
the fixtures name real things; a broken one is a real name with a typo, and must be reported with
its file and line.
"""

from __future__ import annotations

import pytest

from schema.topology import WORK_QUEUES
from scripts import check_docs


@pytest.fixture(scope="module")
def names() -> check_docs.Names:
    return check_docs.collect_names()


def problems(names: check_docs.Names, text: str, path: str = "docs/fixture.md") -> list[str]:
    return [str(p) for p in check_docs.check_doc(path, text, names)]


GOOD = """\
# A good doc

## Running it

Start `orders worker --processes 2 --queue orders.ship`, then `orders dlq replay ID --to orders.place`
and `orders token issue --user alice [--role admin] [--ttl 3600]`; `orders migrate && orders topology`.
Settings: `worker.batch_size`, `shim.jwt_secret: something`, `payments.mode: test`, `metrics.port + 1`,
`ORDERS_WORKER__BATCH_SIZE=500`, `ORDERS_SENDERS` (the whole map, in JSON), `ORDERS_ENVIRONMENT`,
`ORDERS_CONFIG`, `ORDERS_PASSWORD_SHOP`, `ORDERS_<SECTION>__<KEY>`.
Names of the contract: `orders.commands`, `orders.place`, `orders.payments`, `orders.dead-letter`,
`order.ship`, `order.refunded`, `stock.return`, `command.refused`, `payment.start`, the tiers
`orders.delay.<n>s`; columns and fields: `orders.currency`, `payment.amount_refunded`,
`requested_by.user_id`; a span attribute: `orders.order_id`.
HTTP: `POST /orders`, `GET /orders/{id}`, `PUT /orders/{order_id}/cancel`, `/healthz`,
`/console/dead-letters/messages/abc/def`.
Code: `worker/settings.py`, `deploy/k8s/`, `scripts/check.sh`, `place_order.py`, `rabbit/`,
`worker.handled.handled_from`, `worker.consume.Batches.submit`, `consume.Batches.submit`,
`schema.messages.PlaceOrder`. Links: [contract](contract.md#order-lifecycle), [README](../README.md),
[here](#running-it); a file named in prose: configuration.md.

Left alone (not ours, or not a name): `kubectl -n orders delete job orders-release`, `/tmp/x.alive`,
`GET /v1/refunds?payment_intent=`, `stripe.StripeClient`, `pending`, `relay`, `shared/specs/keda/`,
`fresh_database(settings.database)`, `pg_hba.conf`, `--from-env-file=orders.env`, <https://example.com>.

```sh
ORDERS_ORDERS__PAYMENT_TIMEOUT_MINUTES=0.25 bash scripts/up.sh
TOKEN=$(.venv/bin/orders token issue --user alice)
curl -s localhost:8000/orders/$ORDER/history -H "Authorization: Bearer $TOKEN"
15 5 * * *  orders reconcile --provider stripe --since 26h --json > /var/log/x.json
```

```
upstream ──► orders.commands ──► orders.place | orders.cancel | orders.payment-confirmed | orders.ship
```
"""


def test_a_doc_that_names_only_what_exists_passes(names: check_docs.Names) -> None:
    assert problems(names, GOOD) == []


BROKEN = [
    # CLI: a verb, a subverb, an option, in a code span and in a shell block
    ("Run `orders wroker`.", "`orders` has no verb 'wroker'"),
    ("Run `orders dlq replya ID`.", "`orders dlq` has no verb 'replya'"),
    ("Run `orders worker --procs 2`.", "`orders worker` has no option --procs"),
    ("```sh\nFOO=1 .venv/bin/orders status --jsn\n```", "`orders status` has no option --jsn"),
    # settings, both forms
    ("Set `worker.batch_sise`.", "no setting worker.batch_sise"),
    ("Set `shim.jwt_secrets`.", "settings section 'shim' has no key 'jwt_secrets'"),
    (
        "Set `ORDERS_WORKER__BATCH_SISE=3`.",
        "ORDERS_WORKER__BATCH_SISE: settings section 'worker' has no key 'batch_sise'",
    ),
    ("Set ORDERS_SHIMM__PORT.", "ORDERS_SHIMM__PORT: no settings section 'shimm'"),
    ("Set `ORDERS_SENDER` to JSON.", "ORDERS_SENDER is no setting"),
    # queues, exchanges, routing keys
    ("The queue `orders.plase`.", "`orders.plase` is no setting, queue, exchange, routing key"),
    ("The exchange `orders.event`.", "`orders.event` is no setting, queue, exchange, routing key"),
    ("The event `order.shipd`.", "`order.shipd` is no setting, queue, exchange, routing key"),
    ("The tier `orders.dellay.<n>s`.", "`orders.dellay.<n>s` is no setting"),
    # HTTP paths of the shim
    ("Read `GET /orders/{id}/histroy`.", "`GET /orders/{id}/histroy` is no route of the shim"),
    ("Then `DELETE /orders/{id}`.", "not DELETE"),
    ("See `/console/dead-leters`.", "`/console/dead-leters` is no route of the shim"),
    ("```sh\ncurl localhost:8000/order/$ORDER\n```", "`/order/$ORDER` is no route of the shim"),
    # files and links
    ("In `worker/nothere.py`.", "`worker/nothere.py` is not in the repository"),
    ("In `deploy/k9s/`.", "`deploy/k9s/` is not in the repository"),
    ("In `place_orders.py`.", "`place_orders.py`: no file of that name"),
    ("See DESIGN.md for the contract.", "`DESIGN.md`: no file of that name"),
    ("See [the contract](contracts.md).", "link contracts.md: contracts.md is not in the repository"),
    ("See [it](contract.md#no-such-heading).", "contract.md has no heading #no-such-heading"),
    ("See [above](#nowhere).", "link #nowhere: no such heading here"),
    # Python names
    ("`worker.handled.handled_frm` decides.", "worker.handled defines no 'handled_frm'"),
    ("`worker.consume.Batches.submitt` takes it.", "worker.consume.Batches has no 'submitt'"),
    ("`unit_of_work.order_transactions` opens it.", "defines no 'order_transactions'"),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN, ids=[e for _, e in BROKEN])
def test_each_kind_of_broken_name_is_reported_with_its_file_and_line(
    names: check_docs.Names, text: str, expected: str
) -> None:
    found = problems(names, "# Title\n\n" + text + "\n")
    line = 4 if text.startswith("```") else 3  # the name's line, under the fence when in a block
    assert len(found) == 1, found
    assert found[0].startswith(f"docs/fixture.md:{line}: "), found
    assert expected in found[0]


def test_an_allowed_mention_is_not_reported(names: check_docs.Names, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "# T\n\nBefore 2.0 it was `worker.batch_max` (now `worker.batch_size`).\n"
    assert len(problems(names, text)) == 1
    monkeypatch.setitem(check_docs.ALLOWED, "worker.batch_max", "a removed setting, named in a migration note")
    assert problems(names, text) == []


def test_the_names_are_the_codes(names: check_docs.Names) -> None:
    """The introspection finds what the code has (a sample of each kind), not an empty world that passes anything."""
    assert {"worker", "token", "dlq", "reconcile"} <= set(names.cli.subcommands)
    assert "--queue" in names.cli.subcommands["worker"].options
    assert "batch_size" in (names.settings["worker"] or ())
    assert names.settings["senders"] is None  # a whole mapping, set as one variable
    assert {"orders.ship", "orders.events", "order.refunded", "payment.settle", "orders.delay.30s"} <= names.dotted
    assert (frozenset({"PUT"}), "/orders/{order_id}/cancel") in names.routes
    assert "ORDERS_CONFIG" in names.code_env


def test_the_repositorys_docs_name_only_what_exists(names: check_docs.Names) -> None:
    anchors: dict[str, set[str]] = {}
    found = []
    for path in check_docs.doc_files():
        rel = str(path.relative_to(check_docs.ROOT))
        found += check_docs.check_doc(rel, path.read_text(encoding="utf-8"), names, anchors)
    assert [str(p) for p in found] == []


def test_the_worker_help_names_every_work_queue() -> None:
    import typer

    from worker.cli import app

    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    (queue,) = [p for p in worker.params if "--queue" in p.opts]
    assert all(q in queue.help for q in WORK_QUEUES), queue.help
