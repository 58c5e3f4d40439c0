"""The built-in agents on real input: the example documents and messages of the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agents import Classifier, CodeRunner, FieldExtractor, Summarizer
from agents._text import sentences
from factory.errors import AgentError, StepInputError

REPO = Path(__file__).parent.parent.parent
SAMPLES = REPO / "examples" / "doc_report" / "samples"
TRIAGE = REPO / "examples" / "agents_triage" / "samples"

TICKET_LABELS = {
    "billing": {
        "description": "Payments, invoices, refunds, charges and subscriptions.",
        "keywords": ["refund", "invoice", "charged", "payment"],
    },
    "technical": {
        "description": "Bugs, errors, crashes, outages and features that do not work.",
        "keywords": ["error", "crash", "bug", "not working"],
    },
    "account": {
        "description": "Login, password, profile and account access.",
        "keywords": ["password", "log in", "locked out"],
    },
}


def test_sentence_splitter_keeps_abbreviations_and_splits_tables() -> None:
    text = "Dr. Smith arrived at 9 a.m. on Monday. He left early!\n\nItem   Qty\nChairs   4\nDesks   2"
    assert sentences(text) == [
        "Dr. Smith arrived at 9 a.m. on Monday.",
        "He left early!",
        "Item   Qty",
        "Chairs   4",
        "Desks   2",
    ]


@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.txt"))[:4], ids=lambda p: p.stem)
def test_summarizer_picks_central_sentences_in_order(sample: Path) -> None:
    text = sample.read_text(encoding="utf-8")
    agent = Summarizer({"max_sentences": 3, "keywords": 5})
    result = agent.handle(agent.prepare_task({"text": text}))
    source = sentences(text)
    assert len(result.sentences) == 3 and result.source_sentences == len(source)
    positions = [source.index(s) for s in result.sentences]  # verbatim sentences of the text ...
    assert positions == sorted(positions)  # ... in the document's order
    assert result.summary == " ".join(result.sentences)
    assert 0 < result.compression < 0.6
    assert len(result.keywords) == 5 and all(k.lower() in text.lower() for k in result.keywords)


def test_summarizer_keywords_name_the_topic_and_the_task_can_ask_for_fewer_sentences() -> None:
    text = (SAMPLES / "tidal_energy.txt").read_text(encoding="utf-8")
    agent = Summarizer()
    result = agent.handle(agent.prepare_task({"text": text, "sentences": 1}))
    assert len(result.sentences) == 1
    assert "tidal" in result.keywords
    with pytest.raises(StepInputError, match="text"):
        agent.prepare_task({"sentences": 2})


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("I was charged twice this month, please refund the second payment.", "billing"),
        ("The app crashes with an error every time I open the settings page.", "technical"),
        ("I forgot my password and now I am locked out of my account.", "account"),
        ("Why does my invoice show a payment for a plan I cancelled?", "billing"),
    ],
)
def test_classifier_labels_support_tickets(text: str, label: str) -> None:
    agent = Classifier({"labels": TICKET_LABELS})
    result = agent.handle(agent.prepare_task({"text": text}))
    assert result.label == label, result.scores
    assert result.scores[label] == max(result.scores.values())
    assert 0.5 <= result.confidence <= 1.0


def test_classifier_falls_back_when_nothing_fits_and_rejects_one_label() -> None:
    agent = Classifier({"labels": TICKET_LABELS, "fallback": "other"})
    result = agent.handle(agent.prepare_task({"text": "What a lovely day for a picnic by the river."}))
    assert result.label == "other" and result.confidence == 0.0
    with pytest.raises(AgentError, match="labels"):
        Classifier({"labels": {"only": "one label"}})


def test_classifier_on_the_triage_messages() -> None:
    import yaml

    catalog = yaml.safe_load((REPO / "examples/agents_triage/agents.yaml").read_text())
    config = next(a["config"] for a in catalog["agents"] if a["name"] == "classifier")
    agent = Classifier(config)
    for name, label in (("invoice_email.txt", "invoice"), ("complaint_email.txt", "complaint")):
        result = agent.handle(agent.prepare_task({"text": (TRIAGE / name).read_text()}))
        assert result.label == label, (name, result.scores)


def test_extractor_reads_an_invoice() -> None:
    agent = FieldExtractor()
    result = agent.handle(agent.prepare_task({"text": (TRIAGE / "invoice_email.txt").read_text()}))
    fields = result.fields
    assert fields["kind"] == "invoice"
    assert fields["invoice_number"] == "INV-2024-0173"
    assert fields["po_number"] == "PO-88812"
    assert fields["invoice_date"] == "2024-03-12"
    assert fields["due_date"] == "2024-04-11"
    assert (fields["subtotal"], fields["tax"], fields["total"]) == (830.0, 166.0, 996.0)
    assert fields["currency"] == "GBP"
    assert fields["customer"].startswith("Northwind Traders")
    assert fields["iban"] == "GB29NWBK60161331926819"
    assert "+44 117 496 0123" in fields["phones"] and not any("6016" in p for p in fields["phones"])
    assert fields["subject"] == "Invoice INV-2024-0173 for your March order"
    assert fields["date"] == "2024-03-12T10:02:11+00:00"
    assert set(result.found) | set(result.missing) == set(agent.config.fields)


def test_extractor_reads_an_email_with_chosen_and_custom_fields() -> None:
    agent = FieldExtractor({"fields": ["from", "subject", "phones", "total"], "patterns": {"order": r"order (\d+)"}})
    result = agent.handle(agent.prepare_task({"text": (TRIAGE / "complaint_email.txt").read_text()}))
    assert result.fields == {
        "from": "Jane Doe <jane.doe@example.com>",
        "subject": "Order 5531 arrived damaged",
        "phones": ["555-013-2270"],
        "order": "5531",
    }
    assert result.missing == ["total"]
    with pytest.raises(AgentError, match="one \\(group\\)"):
        FieldExtractor({"patterns": {"bad": "no group"}})


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="the local executor needs bubblewrap")
def test_code_runner_runs_code_in_the_sandbox() -> None:
    agent = CodeRunner({"timeout": 5})
    ok = agent.handle(agent.prepare_task({"code": "import sys\nprint(sum(range(101)))\nprint('x', file=sys.stderr)"}))
    assert ok.ok and ok.exit_code == 0 and ok.stdout.strip() == "5050" and ok.executor == "local"
    failed = agent.handle(agent.prepare_task({"code": "raise SystemExit(3)"}))
    assert not failed.ok and failed.exit_code == 3
    offline = agent.handle(
        agent.prepare_task({"code": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)"})
    )
    assert not offline.ok and "Error" in offline.stderr  # no network in the sandbox
    slow = agent.handle(agent.prepare_task({"code": "while True: pass", "timeout": 1}))
    assert slow.timed_out and not slow.ok
    shell = agent.handle(agent.prepare_task({"code": "echo $((6 * 7))", "language": "sh"}))
    assert shell.stdout.strip() == "42"
