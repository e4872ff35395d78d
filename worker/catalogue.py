"""The product catalogue: read a CSV or JSON file and upsert it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine, func
from sqlalchemy.dialects.postgresql import insert

from schema import tables
from schema.messages import Currency, ProductId


class CatalogueError(Exception):
    pass


class ProductRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    product_id: ProductId
    name: str = Field(min_length=1, max_length=200)
    price: int = Field(ge=0)  # minor units
    currency: Currency
    active: bool = True


def read(path: Path) -> list[ProductRow]:
    """Parse and validate the whole file before anything is written."""
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, list):
                raise CatalogueError(f"{path}: expected a JSON list of products")
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                raw = list(csv.DictReader(fh))
    except (OSError, json.JSONDecodeError, csv.Error) as exc:
        raise CatalogueError(f"{path}: {exc}") from None
    rows, seen = [], set()
    for n, item in enumerate(raw, 1):
        try:
            row = ProductRow.model_validate(item)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise CatalogueError(f"{path}: product {n}: {fields}") from None
        if row.product_id in seen:
            raise CatalogueError(f"{path}: product {row.product_id} appears twice")
        seen.add(row.product_id)
        rows.append(row)
    return rows


def upsert(engine: Engine, rows: list[ProductRow]) -> int:
    if not rows:
        return 0
    stmt = insert(tables.products)
    stmt = stmt.on_conflict_do_update(
        index_elements=["product_id"],
        set_={c: stmt.excluded[c] for c in ("name", "price", "currency", "active")} | {"updated_at": func.now()},
    )
    with engine.begin() as conn:
        conn.execute(stmt, [r.model_dump() for r in rows])
    return len(rows)
