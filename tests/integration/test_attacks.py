"""Every attack of benchmarks.attacks against the session's API server, over real HTTP:
each must be stopped by the defence it names (docs/security.md has the table)."""

from __future__ import annotations

import pytest

from benchmarks.attacks import ALLOWED_MODULES, ATTACKS, Attack, AttackContext
from tests.conftest import ApiServer


@pytest.fixture
def ctx(api_server: ApiServer) -> AttackContext:
    assert set(ALLOWED_MODULES) <= set(api_server.settings.allowed_modules)
    return AttackContext(api_server.base_url, api_server.keys, api_server.settings.home)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.run.__name__ for a in ATTACKS])
def test_attack_is_stopped(attack: Attack, ctx: AttackContext) -> None:
    how = attack.run(ctx)  # raises Breach when the attack works
    assert how
