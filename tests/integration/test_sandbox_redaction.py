"""A container step that prints its secret in every common form, cut every way, and nothing keeps it.

One real step through the worker's code path (`factory.runtime.run_attempt`: the
container step, its live `step.log` events into a SQLite store, the attempt's log
cut to its last MAX_LOG_CHARS), under bubblewrap, without Ray; then the events are
published to the machine's Redis (under the test store's own keys). Everything the Factory keeps is searched
for every form of the secret and for either half of it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from factory.redisbus import RedisEventPublisher
from factory.runtime import Outcome, StepCall, run_attempt
from factory.sandbox.redaction import MIN_FRAGMENT_CHARS, REDACTED, secret_forms
from factory.settings import Settings, container_settings
from factory.spec import RetryPolicy
from factory.store.sqlite import SQLiteStore

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap: apt-get install -y bubblewrap")

PRINT_EVERY_FORM = r"""
import base64, sys, time, urllib.parse
fail = sys.argv[1] == "fail"
s = open("/run/secrets/API_TOKEN").read()
b = s.encode()
forms = [s, s[::-1], b.hex(), b.hex().upper(), urllib.parse.quote(s, safe=""), urllib.parse.quote_plus(s)]
for before in ("", "a", "ab"):  # the secret inside a longer text, at each byte alignment of base64
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        forms.append(encode((before + "token=" + s + "\n").encode()).decode())
forms.append(base64.b64encode(b).decode().rstrip("="))
if not fail:
    for form in forms:
        print("out", form, flush=True)
    # cut between two writes, so between two reads of the pipe
    sys.stdout.write("split " + s[:7]); sys.stdout.flush(); time.sleep(0.3)
    sys.stdout.write(s[7:] + "\n"); sys.stdout.flush()
    # one line longer than 64 KiB, the secret across the 65,536-character cut (and the pipe's 64 KiB read)
    sys.stdout.write("L" * (65536 - 10) + s + "R" * 100 + "\n"); sys.stdout.flush()
    # the kept tails (64,000 characters of stdout, 16,000 of stderr) would start inside a secret
    sys.stderr.write(s + "E" * (16000 - 10) + "\n"); sys.stderr.flush()
    sys.stdout.write(s + "T" * (64000 - 10) + "\n"); sys.stdout.flush()
for form in forms:  # last, so the error message's tail of stderr holds them
    print("err", form, file=sys.stderr, flush=True)
sys.exit(3 if fail else 0)
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="factory-redaction-test-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def leaks(text: str, secret: str) -> list[str]:
    """Forms of the secret (or a half of it) in ``text``, and fragments of forms left where it was cut."""
    forms = secret_forms(secret)
    half = len(secret) // 2
    found = [probe for probe in forms | {secret[:half], secret[half:]} if probe in text]
    for form in forms:
        for size in range(MIN_FRAGMENT_CHARS, len(form)):
            if text.startswith(form[-size:]) or text.endswith(form[:size]):
                found.append(f"fragment {form[-size:]!r} or {form[:size]!r}")
    return sorted(found)


def attempt(store_url: str, run_id: str, home: Path, variant: str) -> Outcome:
    call = StepCall(
        step_id=variant,
        target="",
        arguments={
            "image": "host",
            "command": ["/usr/bin/python3", "-c", PRINT_EVERY_FORM, variant],
            "secrets": ["API_TOKEN"],
            "timeout": 60,
        },
        resolved=True,
        inputs={},
        dep_ids=(),
        search_path=(),
        timeout=60,
        retry=RetryPolicy(),
        action="container",
        executor="local",
        home=str(home),
        container_settings=container_settings(Settings(home=home)),
        store_url=store_url,
        run_id=run_id,
    )
    return run_attempt(call, ())


def test_no_form_of_the_secret_reaches_logs_outputs_errors_events_or_redis(
    scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    secret = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("FACTORY_SECRET_API_TOKEN", secret)
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACTORY_SANDBOX_SCRATCH_ROOT", str(scratch))
    store_url = f"sqlite:///{tmp_path / 'factory.db'}"
    store = SQLiteStore(tmp_path / "factory.db")
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    store.create_run(run_id, "leak", "{}", {}, ["ok", "fail"])

    ok = attempt(store_url, run_id, tmp_path / "home", "ok")
    failed = attempt(store_url, run_id, tmp_path / "home", "fail")

    assert ok.ok, ok.error
    assert not failed.ok and "exited with code 3" in (failed.error or "")
    output = json.loads(ok.output_json or "{}")
    kept = {
        "attempt log": ok.logs,
        "stdout": output["stdout"],
        "stderr": output["stderr"],
        "failed attempt's log": failed.logs,
        "error message": failed.error or "",
    }
    for where, text in kept.items():
        assert leaks(text, secret) == [], where
    # Controls: everything was printed, redacted, and the kept texts are the cut tails.
    assert "T" * 1000 in ok.logs  # the last stdout line, whole or cut
    assert len(output["stdout"]) == 64_000 and len(output["stderr"]) == 16_000 and len(ok.logs) == 64_000
    assert output["stderr"].count(REDACTED) >= 13
    assert (failed.error or "").count(REDACTED) >= 10  # the error's tail of stderr holds the masked forms

    events = [event for event in store.events(0, run_id, limit=100_000) if event.type == "step.log"]
    lines = [line for event in events for line in event.data["lines"]]
    assert f"split {REDACTED}" in lines and any(line.startswith("L" * 1000) for line in lines)
    assert leaks(json.dumps([event.data for event in events]), secret) == [], "step.log events"

    # The store's events go to the machine's Redis under this store's own keys, then are removed.
    publisher = RedisEventPublisher(store, redis_url, 100_000)
    try:
        assert publisher.publish_pending() >= len(events)
        entries = publisher.redis.xrange(publisher.keys.run(run_id))
    finally:
        publisher.redis.delete(publisher.keys.events, publisher.keys.cursor, publisher.keys.run(run_id))
    published = json.dumps(entries)
    assert f"split {REDACTED}" in published  # control: the lines are there
    assert leaks(published, secret) == [], "the Redis stream"
    store.close()
