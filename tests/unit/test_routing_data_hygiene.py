"""Nothing the router ships is a near copy of an evaluation task (benchmarks/leakage.py):
word 3-gram Jaccard >= 0.5 here; the embedding check (cosine >= 0.92) is in
tests/integration/test_embedding.py, where the model is."""

from __future__ import annotations

import pytest

from benchmarks.leakage import Text, evaluation_tasks, lexical_near_copies, shipped_texts

pytestmark = pytest.mark.unit


def test_the_checker_reads_the_shipped_texts_and_the_evaluation_sets() -> None:
    shipped, tasks = shipped_texts(), evaluation_tasks()
    assert sum("intents.tsv" in t.source for t in shipped) >= 900
    assert any("examples/agents_triage/agents.yaml" in t.source for t in shipped)
    assert any("/agents/" in t.source for t in shipped)  # the built-in agents' examples
    assert sum("routing-heldout.tsv" in t.source for t in tasks) == 200
    assert sum("routing-ops-tasks.tsv" in t.source for t in tasks) == 120


def test_the_checker_finds_a_copy_and_a_close_paraphrase() -> None:
    task = Text("eval.tsv:2", "Pull company names and funding amounts from this news article into JSON.")
    planted = [
        Text("corpus:1", task.text),
        Text("corpus:2", "Please pull company names and funding amounts from this news article into JSON"),
        Text("corpus:3", "Translate this letter into German."),
    ]
    found = lexical_near_copies(planted, [task])
    assert [n.shipped.source for n in found] == ["corpus:1", "corpus:2"]


def test_no_shipped_text_is_a_near_copy_of_an_evaluation_task() -> None:
    found = lexical_near_copies(shipped_texts(), evaluation_tasks())
    assert not found, "\n".join(f"{n.how}: {n.shipped.source} ~ {n.task.source}: {n.task.text}" for n in found)
