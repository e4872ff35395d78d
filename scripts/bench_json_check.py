#!/usr/bin/env python3
"""CPU per body of the duplicate-key check and of a command's whole decode (a benchmark, not a test).

Every command body and every JSON request body goes through
``schema.jsonstrict.loads_no_duplicates`` before pydantic reads it.  This times,
in this process, on the PlaceOrder bodies ``bench_drain.py`` and ``bench_paid.py``
publish (1-3 lines, a payment), in alternating rounds:

* ``hook``: the standard parser with a Python ``object_pairs_hook`` on every
  object (``schema.jsonstrict._loads_no_duplicates``, what the check was before);
* ``jiter``: the check as it runs now (jiter refuses a repeated key itself);
* ``parse_body``: the whole decode of a PlaceOrder (the check, then pydantic's
  ``model_validate_json``), and pydantic's part alone.

Usage::

    .venv/bin/python scripts/bench_json_check.py [--bodies 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema import jsonstrict  # noqa: E402
from schema.messages import PlaceOrder, parse_body  # noqa: E402
from scripts.bench_drain import make_orders  # noqa: E402


def per_body(fn, bodies: list[bytes]) -> float:  # type: ignore[no-untyped-def]
    """µs of this thread's CPU per body, one pass over them all."""
    started = time.thread_time()
    for b in bodies:
        fn(b)
    return (time.thread_time() - started) / len(bodies) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bodies", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    products = [{"product_id": f"sku-{i:04d}"} for i in range(50)]
    bodies = [json.dumps(o["body"], separators=(",", ":")).encode() for o in make_orders(args.bodies, products)]
    cases = {
        "hook": jsonstrict._loads_no_duplicates,
        "jiter": jsonstrict.loads_no_duplicates,
        "parse_body": lambda b: parse_body(PlaceOrder, b),
        "model_validate_json": PlaceOrder.model_validate_json,
    }
    for fn in cases.values():  # warm: imports, caches
        per_body(fn, bodies[:200])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(args.rounds):
        order = list(cases) if i % 2 == 0 else list(reversed(cases))
        for name in order:
            times[name].append(per_body(cases[name], bodies))
    print(f"{len(bodies)} PlaceOrder bodies, {statistics.mean(map(len, bodies)):.0f} bytes on average; CPU µs per body")
    print("| case | median | rounds |\n| --- | ---: | --- |")
    for name, ts in times.items():
        print(f"| {name} | **{statistics.median(ts):.1f}** | {', '.join(f'{t:.1f}' for t in ts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
