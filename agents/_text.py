"""Small text helpers shared by the built-in agents: sentences, words, stems, stop words."""

from __future__ import annotations

import re

_STOP = """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
    now of off on once only or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves may might must
    shall one two many much every per via yet however thus therefore also within without us let it's isn't"""
STOP_WORDS = frozenset(_STOP.split())

# Abbreviations whose full stop does not end a sentence.
_ABBREV = (
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co corp fig no approx dept est jan feb mar apr jun jul "
    "aug sep sept oct nov dec u.s u.k"
)
_ABBREVIATIONS = frozenset(_ABBREV.split())
_SENTENCE_END = re.compile(r"([.!?]+[\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")


def sentences(text: str) -> list[str]:
    """Split text into sentences; paragraph breaks and bullet lines always end one."""
    found: list[str] = []
    for raw_block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*\u2022]|\d+[.)])\s)", text):
        lines = [line.strip() for line in raw_block.splitlines() if line.strip()]
        if len(lines) > 1 and sum(not line.endswith((".", "!", "?", ",")) for line in lines) > len(lines) / 2:
            # a table, an address or a block of "Label: value" lines: each line stands alone
            found.extend(line for line in lines if any(ch.isalnum() for ch in line))
            continue
        block = " ".join(raw_block.split())
        if not block:
            continue
        start = 0
        for match in _SENTENCE_END.finditer(block):
            candidate = block[start : match.end(1)]
            last_word = candidate.rstrip(".!?\"')]").rsplit(" ", 1)[-1].lower()
            if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
                continue
            found.append(candidate.strip())
            start = match.end()
        tail = block[start:].strip()
        if tail:
            found.append(tail)
    return [s for s in found if any(ch.isalnum() for ch in s)]


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def stem(word: str) -> str:
    """A light suffix stripper: enough to match 'invoices'/'invoice', 'summarising'/'summarise'."""
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ers", "er", "es", "ed", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            if suffix in ("ies", "ied"):
                return base + "y"
            return base
    return word


def content_terms(text: str) -> list[str]:
    """Stemmed words that carry meaning (no stop words, no one-letter words)."""
    return [stem(w) for w in words(text) if w not in STOP_WORDS and len(w) > 1]


def surface_forms(text: str) -> dict[str, str]:
    """For each stem, the word form that occurs most often (to show 'turbines', not 'turbin')."""
    seen: dict[str, dict[str, int]] = {}
    for word in words(text):
        if word not in STOP_WORDS and len(word) > 1:
            forms = seen.setdefault(stem(word), {})
            forms[word] = forms.get(word, 0) + 1
    return {key: max(forms, key=lambda w: (forms[w], -len(w))) for key, forms in seen.items()}
