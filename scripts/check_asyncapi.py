#!/usr/bin/env python3
"""Check docs/asyncapi.yaml: what the code generates, and valid AsyncAPI 3.0 (``scripts/check.sh`` runs it).

1. The checked-in ``docs/asyncapi.yaml`` must be byte for byte what ``orders asyncapi`` generates from
   ``schema/`` now: a model, route or header changed without regenerating it fails, with the diff.
2. The generated document must validate against the AsyncAPI 3.0.0 JSON Schema in
   ``../shared/specs/asyncapi/`` (Draft 7, as its README says), and every ``$ref`` in it must point at
   something in it (the JSON Schema does not follow references).

Exit 0 when both hold, 1 otherwise.  ``--write`` regenerates the file first.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jsonschema  # noqa: E402

from schema import asyncapi  # noqa: E402

CHECKED_IN = ROOT / "docs" / "asyncapi.yaml"
#: shared/ lies beside the repository, in a work tree and in CI's fresh clone
SPEC = ROOT.parent / "shared" / "specs" / "asyncapi" / "asyncapi-3.0.0.json"


def drift(text: str, path: Path = CHECKED_IN) -> str:
    """The unified diff from the checked-in file to ``text``; "" when they are equal."""
    current = path.read_text() if path.exists() else ""
    if current == text:
        return ""
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True), name, "generated"))


def invalid(doc: dict[str, Any], spec_path: Path = SPEC) -> list[str]:
    """Why ``doc`` is not a valid AsyncAPI 3.0 document (empty when it is)."""
    spec = json.loads(spec_path.read_text())
    found = []
    for error in sorted(jsonschema.Draft7Validator(spec).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        # a oneOf (a Reference or an Operation, ...) fails as a whole: name the deepest complaint in its branches
        e = max(error.context, key=lambda c: len(c.absolute_path)) if error.context else error
        found.append(f"/{'/'.join(str(p) for p in e.absolute_path)}: {e.message[:300]}")
    return found + [f"{where}: $ref {ref} points at nothing" for where, ref in dangling_refs(doc)]


def dangling_refs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, $ref) of each local reference in ``doc`` that does not resolve."""
    out: list[tuple[str, str]] = []

    def resolves(ref: str) -> bool:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and (not ref.startswith("#/") or not resolves(ref)):
                out.append((where, ref))
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(doc, "")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate docs/asyncapi.yaml first")
    args = parser.parse_args()
    doc = asyncapi.document()
    text = asyncapi.render(doc)
    if args.write:
        CHECKED_IN.write_text(text)
    status = 0
    diff = drift(text)
    if diff:
        sys.stdout.write(diff)
        print(
            "check_asyncapi: docs/asyncapi.yaml differs from the contract the code generates; "
            "run '.venv/bin/orders asyncapi --output docs/asyncapi.yaml' and commit it",
            file=sys.stderr,
        )
        status = 1
    if not SPEC.exists():
        print(f"check_asyncapi: {SPEC} is missing: the shared/ folder must lie beside the repository", file=sys.stderr)
        return 1
    problems = invalid(doc)
    for p in problems:
        print(f"check_asyncapi: not valid AsyncAPI 3.0: {p}", file=sys.stderr)
    if not problems and not status:
        print(f"check_asyncapi: docs/asyncapi.yaml is what the code generates, valid AsyncAPI {doc['asyncapi']}")
    return 1 if problems else status


if __name__ == "__main__":
    sys.exit(main())
