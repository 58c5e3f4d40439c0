"""Steps of the notify-once example: a side effect (a notice "sent" by appending a line to an
outbox file) done exactly once per order, whatever fails after it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from factory import step_context

ORDERS = [
    {"id": "A-1001", "customer": "ada@example.com", "total": 120.5},
    {"id": "A-1002", "customer": "grace@example.com", "total": 75.0},
    {"id": "A-1003", "customer": "alan@example.com", "total": 310.25},
    {"id": "A-1004", "customer": "edsger@example.com", "total": 42.0},
]


def load_orders() -> list[dict[str, Any]]:
    return ORDERS


def _send(outbox: str, order: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
    """The side effect: what an email or payment API call would be. Returns its receipt."""
    line = {"to": order["customer"], "order": order["id"], "key": idempotency_key}
    with Path(outbox).open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    receipt = hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:12]
    return {"order": order["id"], "receipt": receipt}


def notify(order: dict[str, Any], outbox: str, fail_after_send: bool = False) -> dict[str, Any]:
    ctx = step_context()
    ctx.progress(0.0, f"order {order['id']}: composing")
    time.sleep(0.2)  # composing the notice
    ctx.progress(0.5, f"order {order['id']}: sending")
    # The outside API would get ctx.idempotency_key too, to deduplicate on its side.
    receipt = ctx.once("send", _send, outbox, order, ctx.idempotency_key)
    ctx.emit(receipt)
    if fail_after_send and ctx.attempt == 1:
        raise ConnectionError(f"the connection dropped after order {order['id']}'s notice was sent")
    ctx.progress(1.0, f"order {order['id']}: done")
    return {**receipt, "attempt": ctx.attempt}


def summary(receipts: list[dict[str, Any]], outbox: str) -> dict[str, Any]:
    run_id = step_context().run_id
    sent = [json.loads(line) for line in Path(outbox).read_text().splitlines()]
    mine = [s for s in sent if s["key"].startswith(f"{run_id}-")]  # this run's notices (keys start with its id)
    return {
        "orders": len(receipts),
        "notices_sent": len(mine),
        "attempts": sum(r["attempt"] for r in receipts),
        "each_sent_once": sorted(s["order"] for s in mine) == sorted(r["order"] for r in receipts),
    }
