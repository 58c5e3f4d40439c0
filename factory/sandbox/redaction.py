"""Masking secret values in text: in their common encodings, across chunk cuts and at truncation points.

A :class:`Redactor` is built from the secrets of one step. It replaces by
``***`` every *form* of every value (:func:`secret_forms`): the text itself,
reversed, hex (lower and upper case), URL-encoded (``quote`` with and without
``/`` safe, ``quote_plus``, upper- and lower-case escapes) and base64 (standard
and URL-safe alphabets, with and without padding, and the part of the encoding
that does not depend on the neighbouring bytes at each of the three byte
alignments, so that the base64 of a longer text that contains the secret is
caught too); each line of a multi-line value (a PEM key) counts as a value.

All forms are matched by one compiled regular expression, built as a trie so
that each position of the text costs one dispatch on its first character, and
that the longest form wins where several start at the same place.

Streamed text (a pipe read in chunks, lines handed over one by one) goes
through a :class:`StreamRedactor` (or :class:`LineRedactor`, which also splits
lines): it holds back only the end of what it was given that could still be the
start of a form, so output is the same as redacting the whole text at once,
whatever the cuts, and a complete line is passed on at once unless its end
could begin a secret.

Text cut to a tail (or a head) loses the start (or end) of a form that
straddled the cut: :meth:`Redactor.redact_cut` also masks a leading fragment
that is the end of a form, and a trailing fragment that is the start of one,
when it is at least :data:`MIN_FRAGMENT_CHARS` long (a shorter fragment shows
at most three characters of an encoding and would mask ordinary text).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

from pydantic import SecretStr

REDACTED = "***"
# Values shorter than this are not redacted (they would mask ordinary text); secrets refuses them.
MIN_SECRET_CHARS = 4
# A fragment of a form left at a cut is masked from this length on.
MIN_FRAGMENT_CHARS = 4
# Streaming: forms longer than this are looked up by their first KEY_CHARS characters.
KEY_CHARS = 8

_Trie = dict[str, "_Trie"]
_END = ""  # marks the end of a word in a trie node (a real key is one character)


def _base64_forms(data: bytes) -> set[str]:
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode("ascii")
        forms |= {whole, whole.rstrip("=")}
        for shift in range(3):  # the value starts at byte offset 0, 1 or 2 of a 3-byte group
            encoded = encode(b"\0" * shift + data).decode("ascii")
            first = -(-8 * shift // 6)  # first character made only of the value's bits
            end = 8 * (shift + len(data)) // 6  # past the last one
            forms.add(encoded[first:end])
    return forms


def _lower_escapes(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def secret_forms(value: str) -> set[str]:
    """Every text that :class:`Redactor` masks for ``value`` (only forms of at least MIN_SECRET_CHARS)."""
    data = value.encode("utf-8")
    forms = {value, value[::-1], data.hex(), data.hex().upper()}
    for escaped in (quote(value, safe=""), quote(value), quote_plus(value)):
        forms |= {escaped, _lower_escapes(escaped)}
    forms |= _base64_forms(data)
    return {form for form in forms if len(form) >= MIN_SECRET_CHARS}


def _values(secrets: Mapping[str, SecretStr]) -> set[str]:
    values: set[str] = set()
    for secret in secrets.values():
        value = secret.get_secret_value()
        values.add(value)
        # Multi-line values (a PEM key) may be printed one line at a time: each line counts too.
        values.update(line.strip() for line in value.splitlines() if len(line.strip()) >= MIN_SECRET_CHARS)
    return values


def _trie(words: Iterable[str]) -> _Trie:
    root: _Trie = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[_END] = {}
    return root


def _trie_regex(node: _Trie) -> str:
    """A regex matching the words below ``node``, the longest one where several match.

    Chains of single children become one literal, so the recursion goes only as deep
    as the branch points. Siblings start with different characters: at most one of
    them can match, and a greedy ``?`` after a word's end tries the longer words first.
    """
    branches: list[str] = []
    for char in sorted(key for key in node if key != _END):
        run, child = [char], node[char]
        while len(child) == 1 and _END not in child:
            ((next_char, child),) = child.items()
            run.append(next_char)
        branches.append(re.escape("".join(run)) + _trie_regex(child))
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if _END in node else body


class Redactor:
    """Replaces every form of every secret value by ``***``; see the module's documentation."""

    def __init__(self, secrets: Mapping[str, SecretStr]) -> None:
        forms: set[str] = set()
        for value in _values(secrets):
            forms |= secret_forms(value)
        self.forms: tuple[str, ...] = tuple(sorted(forms, key=len, reverse=True))
        self.longest = len(self.forms[0]) if self.forms else 0
        self._pattern = re.compile(_trie_regex(_trie(self.forms))) if self.forms else None
        # For streaming: where the end of a text could still become a form (see StreamRedactor).
        long_forms = [form for form in self.forms if len(form) > KEY_CHARS]
        self._by_key: dict[str, list[str]] = {}
        for form in long_forms:
            self._by_key.setdefault(form[:KEY_CHARS], []).append(form)
        self._keys = re.compile(f"(?={_trie_regex(_trie(self._by_key))})") if self._by_key else None
        self._short_prefixes = {form[:k] for form in self.forms for k in range(1, min(KEY_CHARS, len(form)))}
        self._chars = frozenset("".join(self.forms))

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)

    def stream(self) -> StreamRedactor:
        """A redactor for one stream of text given in pieces."""
        return StreamRedactor(self)

    def redact_cut(self, text: str, *, head: bool = False, tail: bool = False) -> str:
        """Redact ``text`` that was cut from a longer one at its start (``head``) and/or its end (``tail``).

        Besides every complete form, a leading fragment that ends a form and a trailing
        fragment that starts one are masked, from MIN_FRAGMENT_CHARS characters on.
        """
        text = self(text)
        if self._pattern is None:
            return text
        lead = self._leading_fragment(text) if head else 0
        trail = self._trailing_fragment(text[lead:]) if tail else 0
        return (REDACTED if lead else "") + text[lead : len(text) - trail] + (REDACTED if trail else "")

    def _leading_fragment(self, text: str) -> int:
        """Length of the longest start of ``text`` that is a proper end of a form (0 if too short)."""
        if len(text) < MIN_FRAGMENT_CHARS:
            return 0
        probe, best = text[:MIN_FRAGMENT_CHARS], 0
        for form in self.forms:
            at = form.find(probe, 1)
            while at != -1:
                if len(form) - at > best and text.startswith(form[at:]):
                    best = len(form) - at
                at = form.find(probe, at + 1)
        return best

    def _trailing_fragment(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper start of a form (0 if too short)."""
        if len(text) < MIN_FRAGMENT_CHARS:
            return 0
        probe, best = text[-MIN_FRAGMENT_CHARS:], 0
        for form in self.forms:
            at = form.find(probe)
            while at != -1:
                size = at + MIN_FRAGMENT_CHARS
                if best < size < len(form) and text.endswith(form[:size]):
                    best = size
                at = form.find(probe, at + 1)
        return best

    def pending(self, text: str) -> int:
        """The first position from which the end of ``text`` is a proper start of a form (len(text): none).

        Before it, no form can match differently once more text comes, so everything
        there can be redacted and passed on now.
        """
        size = len(text)
        if not size or text[-1] not in self._chars:  # a line's newline, usually: nothing can be pending
            return size
        start = max(0, size - self.longest + 1)
        if self._keys is not None:
            for found in self._keys.finditer(text, start):
                at = found.start()
                tail = text[at:]
                if any(len(form) > len(tail) and form.startswith(tail) for form in self._by_key[tail[:KEY_CHARS]]):
                    return at
        for at in range(max(start, size - KEY_CHARS + 1), size):
            if text[at:] in self._short_prefixes:
                return at
        return size

    def redact_until(self, text: str, pending: int) -> tuple[str, int]:
        """Redact the matches that start before ``pending``; returns the text up to where that is final."""
        if self._pattern is None:
            return text, len(text)
        out: list[str] = []
        done = 0
        for match in self._pattern.finditer(text):
            if match.start() >= pending:
                break
            out += [text[done : match.start()], REDACTED]
            done = match.end()
        cut = max(done, pending)
        out.append(text[done:cut])
        return "".join(out), cut


class StreamRedactor:
    """Redacts text given in pieces; what it returns, joined, is the whole text redacted at once.

    It holds back the end of the text seen so far only from where it could still
    grow into a form (at most the longest form's length minus one), until the next
    piece or :meth:`flush`.
    """

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._held = ""

    def feed(self, text: str) -> str:
        if not self.redactor.forms:
            return text
        text = self._held + text
        redacted, cut = self.redactor.redact_until(text, self.redactor.pending(text))
        self._held = text[cut:]
        return redacted

    def flush(self) -> str:
        """The rest, redacted; call at the end of the stream."""
        held, self._held = self._held, ""
        return self.redactor(held)


class LineRedactor:
    """A :class:`StreamRedactor` that hands its output back as lines (each ending with a newline).

    A line longer than ``max_line`` characters is passed on in pieces of that size (the
    newline stays with the last one);
    :meth:`flush` returns the last, unfinished line.
    """

    def __init__(self, redactor: Redactor, max_line: int = 65_536) -> None:
        self._stream = redactor.stream()
        self.max_line = max_line
        self._partial = ""

    def feed(self, text: str) -> list[str]:
        return self._split(self._stream.feed(text))

    def flush(self) -> list[str]:
        lines = self._split(self._stream.flush())
        if self._partial:
            lines.append(self._partial)
            self._partial = ""
        return lines

    def _split(self, text: str) -> list[str]:
        if not text:
            return []
        *complete, self._partial = (self._partial + text).split("\n")
        lines: list[str] = []
        for line in complete:
            while len(line) > self.max_line:
                lines.append(line[: self.max_line])
                line = line[self.max_line :]
            lines.append(line + "\n")
        while len(self._partial) > self.max_line:
            lines.append(self._partial[: self.max_line])
            self._partial = self._partial[self.max_line :]
        return lines
