"""Steps of the release_gate example: plain functions, standard library only."""

from __future__ import annotations

import hashlib


def build(version: str, changes: list[str]) -> dict[str, object]:
    """A release candidate: its version, what changed and a digest of it."""
    digest = hashlib.sha256("\n".join([version, *changes]).encode()).hexdigest()[:12]
    return {"version": version, "changes": changes, "digest": digest, "risky": any("schema" in c for c in changes)}


def deploy(candidate: dict[str, object], decision: dict[str, object]) -> dict[str, object]:
    """Deploys only what a person approved; says who approved it and why."""
    if not decision.get("approved"):
        return {"deployed": False, "reason": decision.get("comment") or "rejected"}
    return {
        "deployed": True,
        "version": candidate["version"],
        "digest": candidate["digest"],
        "approved_by": decision.get("by"),
        "comment": decision.get("comment"),
    }
