"""Python steps of the triage example: read a message, write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def read_message(path: str) -> dict[str, str]:
    """The message split for the agents: its subject, its headers, its body and the whole text."""
    file = Path(path) if Path(path).is_absolute() else HERE / path
    text = file.read_text(encoding="utf-8")
    head, _, body = text.partition("\n\n")
    if not all(":" in line for line in head.splitlines() if line.strip()):  # no header block
        head, body = "", text
    subject = next(
        (line.split(":", 1)[1].strip() for line in head.splitlines() if line.lower().startswith("subject:")), ""
    )
    return {"subject": subject, "headers": head, "body": body.strip(), "text": text}


def report(
    message: dict[str, str],
    label: dict[str, Any],
    fields: dict[str, Any],
    summary: dict[str, Any],
    check: dict[str, Any],
) -> dict[str, Any]:
    """One record of what each agent said, and who said it (and why, for routed steps)."""
    found = fields["result"]["fields"]
    lines = [
        f"# {message['subject'] or 'Message'}",
        f"- label: {label['result']['label']} (confidence {label['result']['confidence']:.2f}, agent {label['agent']})",
        f"- fields (agent {fields['agent']}, routed: {fields['route']['reason']}):",
        *[f"  - {name}: {value}" for name, value in found.items() if name != "kind"],
        f"- arithmetic check (agent {check['agent']}): {check['result']['stdout'].strip()}",
        f"- summary (agent {summary['agent']}): {summary['result']['summary']}",
    ]
    return {
        "label": label["result"]["label"],
        "invoice_number": found.get("invoice_number"),
        "total": found.get("total"),
        "due_date": found.get("due_date"),
        "arithmetic": check["result"]["stdout"].strip(),
        "routed": {"fields": fields["agent"], "summary": summary["agent"]},
        "markdown": "\n".join(lines) + "\n",
    }
