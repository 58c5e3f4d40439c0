"""fast-agent's workflow patterns as durable Factory workflows, on the session's real Ray, offline.

- parallel: the fan-out steps really run at the same time, on different pools and on one pool with
  max_concurrency > 1 (fast-agent's ``slow`` model answers after 3 s: run one after another, their
  answers would come 3 s apart); the same steps on a pool of one slot come 3 s apart.
- evaluator_optimizer: a loop whose worker is SIGKILLed after round 2 resumes at round 3 (the
  agents count their calls: the first two rounds are not asked again).
- maker: k samples spread over the replicas, a majority, no majority, and the failing variant.
Each example under examples/ runs. No hosted model.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import factory
from factory.catalog import AgentSpec, Catalog, load_catalog
from factory.cli import app
from factory.pools import DEFAULT_MANAGER_NAME, stop_manager
from factory.settings import Settings
from factory.spec import RetryPolicy, Step, Workflow
from factory.store import RunStatus
from factory.store.sqlite import SQLiteStore
from tests.fixtures.chat_standin import COMPLETION_TOKENS, PROMPT_TOKENS, ChatStandIn

if importlib.util.find_spec("fast_agent") is None:
    pytest.skip("fast-agent is not installed (pip install -e '.[fast-agent]')", allow_module_level=True)

REPO = Path(__file__).parent.parent.parent
FIXTURES = str(Path(__file__).parent.parent / "fixtures")
EXAMPLES = REPO / "examples"
SLOW_SECONDS = 3.0  # fast-agent's `slow` model: passthrough after 3 s

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def store(factory_home: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(factory_home / "factory.db")
    try:
        yield s
    finally:
        s.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def fixture_agent(name: str, cls: str, config: dict[str, Any], **pool: Any) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "name": name,
            "class": f"pattern_agents:{cls}",
            "pool": {"num_cpus": 0.1, "max_replicas": 1, **pool},
            "config": config,
        }
    )


def finish_times(store: SQLiteStore, run_id: str, step_ids: list[str]) -> list[float]:
    steps = {s.step_id: s for s in store.get_steps(run_id)}
    return sorted(float(steps[i].finished_at or 0) for i in step_ids)


# -- parallel ----------------------------------------------------------------------------------


def test_the_parallel_example_runs_its_reviewers_at_the_same_time(store: SQLiteStore, settings: Any) -> None:
    folder = EXAMPLES / "fast_agent_parallel"
    catalog = load_catalog(folder / "agents.yaml")
    reviewers = ["proofreader", "fact_checker", "style_checker"]
    slow = [
        spec.model_copy(update={"config": {**spec.config, "model": "slow"}}) if spec.name in reviewers else spec
        for spec in catalog.agents
    ]
    catalog = catalog.model_copy(update={"agents": slow})
    # the first run starts the four pools (one after another, as the steps first reach them); the
    # second finds them warm, so what its timing shows is the steps' own
    cold = factory.run(folder / "workflow.yaml", store=store, settings=settings, agents=catalog)
    assert cold.ok, cold.error
    started = time.time()
    run = factory.run(folder / "workflow.yaml", store=store, settings=settings, agents=catalog)
    assert run.ok, run.error
    fan_out = ["proofread", "check_facts", "check_style"]
    done = finish_times(store, run.run_id, fan_out)
    # each review took 3 s; one after another their answers would have come 3 s apart
    assert done[-1] - done[0] < SLOW_SECONDS, done
    assert done[0] - started >= SLOW_SECONDS
    assert done[-1] - started < 2 * SLOW_SECONDS, done
    story = yaml.safe_load((folder / "workflow.yaml").read_text())["inputs"]["story"]
    out = run.outputs
    assert out["proofread"]["result"]["text"] == f"Proofread this story:\n{story}"
    grade = out["grade"]["result"]["text"]  # the fan-in saw every review
    for step in fan_out:
        assert out[step]["result"]["text"] in grade
    graded = {s.step_id: s for s in store.get_steps(run.run_id)}["grade"]
    assert (graded.started_at or 0) >= done[-1]


@pytest.mark.parametrize(("slots", "parallel"), [(4, True), (1, False)])
def test_fan_out_steps_on_one_pool_overlap_up_to_its_concurrency(
    store: SQLiteStore, settings: Any, slots: int, parallel: bool
) -> None:
    """Three steps on one pool of one replica: with 4 slots their 3 s answers overlap; with 1 slot
    the replica serves them one after another (the control: the measure can tell them apart)."""
    spec = AgentSpec.model_validate(
        {
            "name": f"slow-reviewer-{slots}",
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1, "max_concurrency": slots},
            "config": {"model": "slow", "timeout_seconds": 60},
        }
    )
    fan_out = [Step(id=f"review{i}", agent=spec.name, with_={"text": f"part {i}"}) for i in range(3)]
    fan_in = Step(
        id="combine",
        python="pattern_agents:join",
        with_={"parts": [f"${{steps.review{i}.output.result.text}}" for i in range(3)]},
    )
    flow = Workflow(name="one-pool-parallel", steps=[*fan_out, fan_in], base_dir=FIXTURES)
    run = factory.run(flow, store=store, settings=settings, agents=Catalog(agents=[spec]))
    assert run.ok, run.error
    done = finish_times(store, run.run_id, [s.id for s in fan_out])
    replicas = {run.outputs[s.id]["replica"] for s in fan_out}
    assert len(replicas) == 1  # one replica served all three
    if parallel:
        assert done[-1] - done[0] < SLOW_SECONDS, done
    else:
        gaps = [b - a for a, b in itertools.pairwise(done)]
        assert min(gaps) > SLOW_SECONDS * 0.8, done
    assert run.outputs["combine"] == "part 0 | part 1 | part 2"


# -- evaluator_optimizer -----------------------------------------------------------------------


def test_the_refine_example_loops_until_the_critic_accepts(store: SQLiteStore, settings: Any) -> None:
    folder = EXAMPLES / "fast_agent_refine"
    run = factory.run(folder / "workflow.yaml", store=store, settings=settings, agents=folder / "agents.yaml")
    assert run.ok, run.error
    out = run.outputs["refine"]
    assert out["accepted"] is True and out["rounds"] == 2
    assert [h["rating"] for h in out["history"]] == ["POOR", out["rating"]]
    assert out["rating"] in ("GOOD", "EXCELLENT")
    assert "Also mention durable, parallel." in out["text"]  # round 2 answered the feedback
    events = [e.data for e in store.events(run_id=run.run_id) if e.type == "step.emitted"]
    rounds = [item["round"] for data in events for item in data["items"]]
    assert rounds == [1, 2]


def loop_workflow(tmp_path: Path, max_attempts: int) -> tuple[Workflow, Catalog, Path, Path]:
    writes, rates = tmp_path / "writes", tmp_path / "rates"
    catalog = Catalog(
        agents=[
            fixture_agent("numbered-writer", "NumberedWriter", {"log": str(writes)}),
            fixture_agent("draft-critic", "DraftCritic", {"log": str(rates), "accept": 3}),
        ]
    )
    step = Step(
        id="refine",
        python="pattern_agents:loop_killed_after",
        with_={
            "kill_after": 2,
            "marker": str(tmp_path / "killed"),
            "generator": "numbered-writer",
            "evaluator": "draft-critic",
            "task": "Write draft 3.",
            "max_rounds": 5,
        },
        retry=RetryPolicy(max_attempts=max_attempts, backoff=0.05),
    )
    return Workflow(name="loop-crash", steps=[step], base_dir=FIXTURES), catalog, writes, rates


def check_loop(out: dict[str, Any], writes: Path, rates: Path) -> None:
    assert out["accepted"] is True and out["rounds"] == 3 and out["text"] == "draft 3"
    assert [(h["round"], h["text"], h["rating"]) for h in out["history"]] == [
        (1, "draft 1", "POOR"),
        (2, "draft 2", "POOR"),
        (3, "draft 3", "GOOD"),
    ]
    # three rounds, each agent asked once per round: rounds 1 and 2 were not asked again
    assert len(lines(writes)) == 3 and len(lines(rates)) == 3


def test_a_loop_killed_after_round_two_resumes_at_round_three(
    store: SQLiteStore, settings: Any, tmp_path: Path
) -> None:
    flow, catalog, writes, rates = loop_workflow(tmp_path, max_attempts=1)
    first = factory.run(flow, store=store, settings=settings, agents=catalog)
    assert first.status == RunStatus.FAILED  # its worker died in the middle of the loop
    assert (tmp_path / "killed").exists()
    assert len(lines(writes)) == 2 and len(lines(rates)) == 2
    resumed = factory.resume(first.run_id, store=store, settings=settings, agents=catalog)
    assert resumed.ok, resumed.error
    check_loop(resumed.outputs["refine"], writes, rates)


def test_a_loop_killed_after_round_two_is_retried_from_round_three(
    store: SQLiteStore, settings: Any, tmp_path: Path
) -> None:
    flow, catalog, writes, rates = loop_workflow(tmp_path, max_attempts=2)
    run = factory.run(flow, store=store, settings=settings, agents=catalog)
    assert run.ok, run.error
    attempts = store.get_attempts(run.run_id, "refine")
    assert len(attempts) == 2 and "worker" in (attempts[0].error or "")
    check_loop(run.outputs["refine"], writes, rates)


# -- maker -------------------------------------------------------------------------------------


def vote_flow(agent: str, k: int, on_no_majority: str = "return", max_attempts: int = 1) -> Workflow:
    step = Step(
        id="vote",
        python="factory.patterns:maker",
        with_={"agent": agent, "task": {"text": "What is 6 x 7?"}, "k": k, "on_no_majority": on_no_majority},
        retry=RetryPolicy(max_attempts=max_attempts, backoff=0.05),
    )
    return Workflow(name="vote", steps=[step], base_dir=FIXTURES)


def test_maker_takes_the_majority_of_samples_spread_over_replicas(
    store: SQLiteStore, settings: Any, tmp_path: Path
) -> None:
    log = tmp_path / "votes"
    voter = fixture_agent(
        "voter-majority",
        "Voter",
        {"log": str(log), "answers": ["42", " 42.", "41"], "sleep": 0.5},
        min_replicas=2,
        max_replicas=2,
        max_concurrency=1,
    )
    run = factory.run(vote_flow(voter.name, 3), store=store, settings=settings, agents=Catalog(agents=[voter]))
    assert run.ok, run.error
    out = run.outputs["vote"]
    assert out["majority"] is True and out["answer"] == "42" and out["votes"] == 2 and out["k"] == 3
    assert out["result"]["text"] in ("42", " 42.")
    assert out["tally"] == [{"answer": "42", "votes": 2}, {"answer": "41", "votes": 1}]
    assert len(lines(log)) == 3  # the same task, sent three times
    assert len(out["replicas"]) == 2 and sum(out["replicas"].values()) == 3  # both replicas answered


def test_maker_without_a_majority_says_so_or_fails(store: SQLiteStore, settings: Any, tmp_path: Path) -> None:
    log = tmp_path / "votes"
    voter = fixture_agent("voter-split", "Voter", {"log": str(log), "answers": ["red", "green", "blue", "red"]})
    agents = Catalog(agents=[voter])
    run = factory.run(vote_flow(voter.name, 3), store=store, settings=settings, agents=agents)
    assert run.ok, run.error
    out = run.outputs["vote"]
    assert out["majority"] is False and out["answer"] is None and out["result"] is None
    assert sorted(row["answer"] for row in out["tally"]) == ["blue", "green", "red"]

    failed = factory.run(vote_flow(voter.name, 4, "fail", 3), store=store, settings=settings, agents=agents)
    assert failed.status == RunStatus.FAILED
    assert "NoMajorityError" in (failed.error or "") and "3 of 4 votes" in (failed.error or "")
    (step,) = store.get_steps(failed.run_id)
    assert step.attempts == 1  # not retried: the recorded samples would vote the same


def test_the_vote_example_runs_offline(store: SQLiteStore, settings: Any) -> None:
    folder = EXAMPLES / "fast_agent_vote"
    run = factory.run(folder / "workflow.yaml", store=store, settings=settings, agents=folder / "agents.yaml")
    assert run.ok, run.error
    out = run.outputs["vote"]
    assert out["majority"] is True and out["answer"] == "42" and out["votes"] == 5 == out["k"]
    assert all(name.startswith("solver-") for name in out["replicas"])


# -- usage and cost ----------------------------------------------------------------------------


def test_a_patterns_agent_tokens_count_for_the_run_and_show_with_their_cost(
    factory_home: Path, standin: ChatStandIn
) -> None:
    """A vote over a fast-agent agent on the stand-in provider (11 tokens in, 7 out per call): the
    python step's output sums its samples' usage, the run's usage (budgets) counts it, and
    `factory status` shows the tokens and the cost estimated from model_prices."""
    prices = {"tiny-local": {"input": 1.0, "output": 2.0}}  # USD per million tokens
    settings = Settings(home=factory_home, model_prices=prices)
    solver = AgentSpec.model_validate(
        {
            "name": "fa-voter",
            "class": "factory.fastagent:FastAgent",
            "pool": {"num_cpus": 0.1, "max_replicas": 1},
            "config": {"model": "generic.tiny-local", "base_url": standin.url},
        }
    )
    store = SQLiteStore(factory_home / "factory.db")
    try:
        run = factory.run(vote_flow("fa-voter", 3), store=store, settings=settings, agents=Catalog(agents=[solver]))
        assert run.ok, run.error
        out = run.outputs["vote"]
        assert out["answer"] == standin.reply.casefold() and out["votes"] == 3
        usage = out["usage"]
        assert (usage["input_tokens"], usage["output_tokens"], usage["requests"]) == (
            3 * PROMPT_TOKENS,
            3 * COMPLETION_TOKENS,
            3,
        )
        assert usage["models"]["tiny-local"]["input_tokens"] == 3 * PROMPT_TOKENS
        counted = [e.data for e in store.events(run_id=run.run_id) if e.type == "run.usage"][-1]
        cost = 3 * (PROMPT_TOKENS * 1.0 + COMPLETION_TOKENS * 2.0) / 1e6
        assert counted["tokens"] == 3 * (PROMPT_TOKENS + COMPLETION_TOKENS)
        assert counted["cost_usd"] == pytest.approx(cost)
    finally:
        store.close()
        stop_manager(DEFAULT_MANAGER_NAME, drain_timeout=0)
    env = {"COLUMNS": "200", "FACTORY_MODEL_PRICES": json.dumps(prices)}
    shown = CliRunner().invoke(app, ["status", run.run_id], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"{3 * PROMPT_TOKENS} in / {3 * COMPLETION_TOKENS} out" in shown.output
    assert f"estimated cost ${cost:.6f}" in shown.output
    unpriced = CliRunner().invoke(app, ["status", run.run_id], env={"COLUMNS": "200"})
    assert "estimated cost ?" in unpriced.output and "no price for tiny-local" in unpriced.output
