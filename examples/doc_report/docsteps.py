"""Step functions for the ``doc-report`` example workflow.

Pure standard library, deterministic, and every return value is JSON-serialisable.

DAG: load_texts -> summarize (for_each document) -> report
"""

import re
from collections import Counter
from pathlib import Path
from typing import Any, TypedDict

HERE = Path(__file__).resolve().parent

WORDS_PER_MINUTE = 200
TOP_TERMS = 5
SUMMARY_SENTENCES = 2
MIN_SUMMARY_WORDS = 6  # sentences shorter than this are not picked for the summary

_STOPWORD_TEXT = """
    a about above after again against all almost also although always am among an and
    another any are aren't around as at be because been before being below between both
    but by can cannot could couldn't did didn't do does doesn't doing don't down during
    each either else enough even ever every far few first for from further had hadn't
    has hasn't have haven't having he her here hers herself him himself his how however
    i if in into is isn't it it's its itself just last least less let like likely made
    make makes many may me might more most much must my myself near need needs never no
    nor not now of off often on once one only onto or other others otherwise our ours
    ourselves out over own per perhaps quite rather really same several shall she should
    shouldn't since so some something sometimes still such than that that's the their
    theirs them themselves then there there's these they they're this those though
    through thus to too toward towards under until up upon us use used uses using very
    was wasn't way we well were weren't what when where whether which while who whom
    whose why will with within without won't would wouldn't yet you your yours yourself
    yourselves
    zero two three four five six seven eight nine ten eleven twelve twenty thirty forty
    fifty sixty seventy eighty ninety hundred thousand million
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)*")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'\u201c(]?[A-Z0-9])")
_TERMINAL_RE = re.compile(r"[.!?][\"'\u201d)]*$")


class Document(TypedDict):
    name: str
    text: str


class DocSummary(TypedDict):
    name: str
    words: int
    sentences: int
    top_terms: list[str]
    summary: str
    reading_minutes: float


class ReportResult(TypedDict):
    markdown: str
    documents: int
    total_words: int
    path: str | None


# --------------------------------------------------------------------------- helpers


def _resolve_input_dir(folder: str) -> Path:
    """Relative folders are resolved against the workflow directory (this file's dir)."""
    path = Path(folder).expanduser()
    return path if path.is_absolute() else HERE / path


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _terms(text: str) -> list[str]:
    """Lower-cased content terms: no stopwords, no numbers, at least 3 letters."""
    terms: list[str] = []
    for word in _words(text):
        term = word.lower().replace("\u2019", "'").removesuffix("'s")
        if len(term) < 3 or term.isdigit() or term in STOPWORDS:
            continue
        terms.append(term)
    return terms


def _sentences(text: str) -> list[str]:
    """Split into sentences. Lines without terminal punctuation (headings) are skipped."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if not flat:
            continue
        if "\n" not in paragraph.strip() and not _TERMINAL_RE.search(flat):
            continue  # a heading / title line
        sentences.extend(s.strip() for s in _SENTENCE_SPLIT_RE.split(flat) if s.strip())
    return sentences


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- steps


def load_texts(folder: str = "samples") -> list[Document]:
    """Read every ``*.txt`` file in ``folder`` (sorted by file name).

    Returns ``[{"name": "<file stem>", "text": "<contents>"}, ...]``.
    """
    directory = _resolve_input_dir(folder)
    if not directory.is_dir():
        raise FileNotFoundError(f"document folder not found: {directory}")
    docs: list[Document] = [
        {"name": path.stem, "text": path.read_text(encoding="utf-8")}
        for path in sorted(directory.glob("*.txt"))
        if path.is_file()
    ]
    if not docs:
        raise ValueError(f"no .txt documents in {directory}")
    return docs


def summarize(doc: Document) -> DocSummary:
    """Statistics and a 2-sentence extractive summary of one document.

    Sentence score = sum of the document frequencies of its content terms divided
    by the sentence's word count (so long sentences are not automatically favoured).
    The best ``SUMMARY_SENTENCES`` sentences are returned in their original order.
    """
    name = str(doc["name"])
    text = str(doc["text"])

    words = _words(text)
    freq = Counter(_terms(text))
    top_terms = [t for t, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TERMS]]

    sentences = _sentences(text)
    scored: list[tuple[float, int]] = []
    for index, sentence in enumerate(sentences):
        n_words = len(_words(sentence))
        if n_words < MIN_SUMMARY_WORDS:
            continue
        score = sum(freq[t] for t in _terms(sentence)) / n_words
        scored.append((score, index))
    if len(scored) < SUMMARY_SENTENCES:  # very short document: consider everything
        scored = [(0.0, i) for i in range(len(sentences))]
    best = sorted(scored, key=lambda si: (-si[0], si[1]))[:SUMMARY_SENTENCES]
    summary = " ".join(sentences[i] for i in sorted(i for _, i in best))

    return {
        "name": name,
        "words": len(words),
        "sentences": len(sentences),
        "top_terms": top_terms,
        "summary": summary,
        "reading_minutes": round(len(words) / WORDS_PER_MINUTE, 1),
    }


def report(summaries: list[DocSummary], title: str = "Report", out: str | None = "") -> ReportResult:
    """Render a Markdown report; write it to ``out`` (relative to the cwd) unless empty.

    Returns ``{"markdown", "documents", "total_words", "path"}`` where ``path`` is the
    absolute path written, or ``None`` when ``out`` is empty.
    """
    items: list[Any] = list(summaries)
    total_words = sum(int(s["words"]) for s in items)
    total_sentences = sum(int(s["sentences"]) for s in items)
    total_minutes = round(total_words / WORDS_PER_MINUTE, 1)
    corpus_terms: Counter[str] = Counter()
    for s in items:
        corpus_terms.update(s["top_terms"])

    lines = [f"# {title}", ""]
    lines.append(
        f"{len(items)} documents, {total_words} words, {total_sentences} sentences, "
        f"about {total_minutes} minutes of reading."
    )
    lines += [
        "",
        "| Document | Words | Sentences | Reading (min) | Top terms |",
        "|---|---:|---:|---:|---|",
    ]
    for s in items:
        lines.append(
            f"| {_md_cell(s['name'])} | {s['words']} | {s['sentences']} | "
            f"{s['reading_minutes']} | {_md_cell(', '.join(s['top_terms']))} |"
        )
    lines.append(f"| **Total** | **{total_words}** | **{total_sentences}** | **{total_minutes}** | |")
    if items:
        longest = max(items, key=lambda s: (s["words"], s["name"]))
        shortest = min(items, key=lambda s: (s["words"], s["name"]))
        lines += [
            "",
            "## Totals",
            "",
            f"- Documents: {len(items)}",
            f"- Total words: {total_words}",
            f"- Average words per document: {round(total_words / len(items), 1)}",
            f"- Longest: {longest['name']} ({longest['words']} words)",
            f"- Shortest: {shortest['name']} ({shortest['words']} words)",
        ]
        shared = sorted((t for t, c in corpus_terms.items() if c > 1))
        if shared:
            lines.append(f"- Top terms shared by several documents: {', '.join(shared)}")
    lines += ["", "## Summaries", ""]
    for s in items:
        lines += [f"### {s['name']}", "", str(s["summary"]), ""]
    markdown = "\n".join(lines).rstrip() + "\n"

    path: str | None = None
    if out:
        target = Path(out).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(markdown, encoding="utf-8")
        path = str(target)

    return {
        "markdown": markdown,
        "documents": len(items),
        "total_words": total_words,
        "path": path,
    }
