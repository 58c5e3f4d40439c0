"""Redaction of secrets: every common encoding, every cut of a stream, the ends of truncated text."""

from __future__ import annotations

import base64
import itertools
import random
import re
import string
import time
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from factory.sandbox.redaction import (
    MIN_FRAGMENT_CHARS,
    REDACTED,
    LineRedactor,
    Redactor,
    secret_forms,
)

SECRET = "s3cr3t/Tok+en~ü-42"


def redactor(*values: str) -> Redactor:
    return Redactor({f"S{i}": SecretStr(value) for i, value in enumerate(values)})


def leaked(text: str, secret: str) -> list[str]:
    """Every form of ``secret`` still in ``text``."""
    return [form for form in secret_forms(secret) if form in text]


def encodings(secret: str) -> dict[str, str]:
    data = secret.encode()
    return {
        "raw": secret,
        "reversed": secret[::-1],
        "hex": data.hex(),
        "HEX": data.hex().upper(),
        "quote": quote(secret),
        "quote safe=''": quote(secret, safe=""),
        "quote_plus": quote_plus(secret),
        "lower-case escapes": re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(secret, safe="")),
        "base64": base64.b64encode(data).decode(),
        "base64 unpadded": base64.b64encode(data).decode().rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(data).decode(),
        "urlsafe base64 unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
    }


@pytest.mark.parametrize("name", list(encodings(SECRET)))
def test_each_encoding_is_masked(name: str) -> None:
    form = encodings(SECRET)[name]
    out = redactor(SECRET)(f"before {form} after")
    assert out == f"before {REDACTED} after", name


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "Authorization: Bearer "])
@pytest.mark.parametrize("suffix", ["", "\n", "!!", "xyz and more"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_of_a_longer_text_is_masked_at_every_alignment(prefix: str, suffix: str, encode: object) -> None:
    encoded = encode(f"{prefix}{SECRET}{suffix}".encode()).decode()  # type: ignore[operator]
    out = redactor(SECRET)(f"echo {encoded} | base64 -d")
    assert REDACTED in out and not leaked(out, SECRET)


def test_every_line_of_a_multi_line_secret_is_masked_and_its_encodings_too() -> None:
    pem = "-----BEGIN KEY-----\nQUJDREVGR0hJSktM\nTU5PUFFSU1RVVldY\n-----END KEY-----"
    redact = redactor(pem)
    assert redact("line: TU5PUFFSU1RVVldY\n") == f"line: {REDACTED}\n"
    assert redact(base64.b64encode(pem.encode()).decode()) == REDACTED
    assert redact(pem.encode().hex()) == REDACTED


def test_the_longest_form_wins_and_ordinary_text_is_kept() -> None:
    redact = redactor("abcd", "abcdefgh")
    assert redact("x abcdefgh y abcd z") == "x *** y *** z"
    assert redactor()("abcd") == "abcd"
    assert redact("nothing secret here: abc, dcb, 616263") == "nothing secret here: abc, dcb, 616263"


# -- streams ------------------------------------------------------------------------------------


def test_a_secret_cut_between_two_chunks_is_masked_at_every_cut() -> None:
    redact = redactor(SECRET)
    for name, form in encodings(SECRET).items():
        text = f"head {form} tail\n"
        for cut in range(1, len(text)):
            stream = redact.stream()
            out = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush()
            assert out == f"head {REDACTED} tail\n", (name, cut)


def test_a_complete_line_is_passed_on_at_once_and_only_a_possible_start_is_held() -> None:
    stream = redactor(SECRET).stream()
    assert stream.feed("progress 10%\n") == "progress 10%\n"  # nothing could start a secret: no delay
    assert stream.feed("token: s3cr") == "token: "  # the end could be a secret's start: held
    assert stream.feed("3t/Tok+en~ü-42 ok\n") == f"{REDACTED} ok\n"
    assert stream.feed("s3c") == "" and stream.flush() == "s3c"  # the end of the stream lets it go


def test_line_redactor_cuts_long_lines_after_masking() -> None:
    lines = LineRedactor(redactor(SECRET), max_line=100)
    long_line = "A" * 95 + SECRET + "B" * 50 + "\n"  # the secret straddles the 100-character cut
    out = lines.feed(long_line[:60]) + lines.feed(long_line[60:]) + lines.feed("last") + lines.flush()
    assert "".join(out) == "A" * 95 + REDACTED + "B" * 50 + "\nlast"
    assert all(len(line) <= 100 for line in out) and out[-1] == "last"


# -- truncation ---------------------------------------------------------------------------------


def test_fragments_left_at_a_cut_are_masked_from_the_minimum_length() -> None:
    redact = redactor(SECRET)
    hexed = SECRET.encode().hex()
    assert redact.redact_cut(SECRET[-6:] + " rest", head=True) == f"{REDACTED} rest"
    assert redact.redact_cut(hexed[-9:] + " rest", head=True) == f"{REDACTED} rest"
    assert redact.redact_cut("rest " + SECRET[:MIN_FRAGMENT_CHARS], tail=True) == f"rest {REDACTED}"
    assert redact.redact_cut("rest " + SECRET[: MIN_FRAGMENT_CHARS - 1], tail=True) == "rest s3c"  # too short
    assert redact.redact_cut(SECRET[-3:] + " rest", head=True) == "-42 rest"
    both = redact.redact_cut(SECRET[5:] + " middle " + SECRET[:9], head=True, tail=True)
    assert both == f"{REDACTED} middle {REDACTED}"
    assert redact.redact_cut("ordinary text", head=True, tail=True) == "ordinary text"


# -- speed --------------------------------------------------------------------------------------


def test_redacting_a_megabyte_with_three_secrets_is_fast() -> None:
    secrets = ["s3cr3t-token-ABCDEFGHIJ1234567890", "hunter2hunter2", "xoxb-1234-5678-abcdefABCDEF"]
    rnd = random.Random(7)
    words = ["".join(rnd.choices(string.ascii_letters + string.digits, k=rnd.randint(1, 12))) for _ in range(3000)]
    text = " ".join(rnd.choice(words) for _ in range(170_000))[:1_000_000]
    text = secrets[1].join(text[i : i + 10_000] for i in range(0, len(text), 10_000))
    redact = redactor(*secrets)
    best = min(_timed(redact, text) for _ in range(3))
    print(f"redacting {len(text) / 1e6:.2f} MB with 3 secrets: {best * 1000:.1f} ms")
    assert best < 0.5  # ~20 ms here; the bound is loose for a loaded machine
    stream, out = redact.stream(), []
    for start in range(0, len(text), 65_536):
        out.append(stream.feed(text[start : start + 65_536]))
    assert "".join(out) + stream.flush() == redact(text)


def _timed(redact: Redactor, text: str) -> float:
    started = time.perf_counter()
    redact(text)
    return time.perf_counter() - started


# -- the property -------------------------------------------------------------------------------

# Secrets and text without "*": the mask itself would otherwise complete a secret that starts with "*".
ALPHABET = string.ascii_letters + string.digits + "-_/+=.:~ %"
secret_text = st.text(alphabet=ALPHABET + "é€", min_size=4, max_size=24).filter(lambda s: len(s.strip()) >= 4)
around = st.text(alphabet=ALPHABET + "\n", max_size=40)


def _encoded(secret: str, how: str, before: str, after: str) -> str:
    data = (before + secret + after).encode()
    return {
        "raw": before + secret + after,
        "reversed": (before + secret + after)[::-1],
        "hex": data.hex(),
        "HEX": data.hex().upper(),
        "quote": quote(before + secret + after, safe=""),
        "quote_plus": quote_plus(before + secret + after),
        "b64": base64.b64encode(data).decode(),
        "b64url": base64.urlsafe_b64encode(data).decode().rstrip("="),
    }[how]


@settings(max_examples=300, deadline=None)
@given(
    secret=secret_text,
    how=st.sampled_from(["raw", "reversed", "hex", "HEX", "quote", "quote_plus", "b64", "b64url"]),
    inner=st.tuples(st.text(alphabet="abc", max_size=3), st.text(alphabet="xyz\n", max_size=3)),
    before=around,
    after=around,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_no_form_of_a_secret_survives_any_chunking(
    secret: str, how: str, inner: tuple[str, str], before: str, after: str, cuts: list[int]
) -> None:
    redact = redactor(secret)
    text = before + _encoded(secret, how, *inner) + after + "\n" + _encoded(secret, how, "", "")
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut < len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    stream = redact.stream()
    streamed = "".join(stream.feed(chunk) for chunk in chunks) + stream.flush()
    assert streamed == redact(text)  # the same as redacting the whole text at once
    assert not leaked(streamed, secret)
    lines = LineRedactor(redact, max_line=16)
    by_lines = [line for chunk in chunks for line in lines.feed(chunk)] + lines.flush()
    assert "".join(by_lines) == streamed and all(len(line) <= 17 for line in by_lines)
