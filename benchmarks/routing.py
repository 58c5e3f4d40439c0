"""Routing benchmark: top-1 accuracy and decision latency of each scorer on a labelled task list.

    python -m benchmarks.routing --agents agents.yaml --tasks tasks.tsv [--scorer NAME] [--only] [--ablation]
    python -m benchmarks.routing --all [--scorer NAME --only] [--learning]

``--all`` measures every catalogue of ``benchmarks/data/routing-sets.yaml`` and prints the
macro average of the development sets (they chose parameters) apart from that of the
reporting sets (they chose nothing: the headline).

``tasks.tsv`` has a header with the columns ``expected`` (the right agent) and
``description`` (the task text). Every scorer that can run here is measured
(``llm`` only when a model is configured), unless ``--only``; the last line is
``accuracy: 0.xx`` for the scorer asked with ``--scorer``. Latency is per
decision (``Router.route``), measured after a warm-up of 100 decisions on the
catalogue's own examples. ``--ablation`` adds the embedding scorer's parts side by side:
``emb-plain`` (the cosine alone: no whitening, no lexical blend), ``emb-nowhiten``,
``emb-nolexical`` and ``emb-numpy`` (the numpy backend instead of ONNX Runtime).
``--all --learning`` prints the learning curves over 0, 1, 3 and 5 corrections per agent in two
protocols: "random" (k random tasks per agent taught) and "mistakes" (the wrong decisions of a
stream corrected, at most k per agent); docs/routing.md describes both.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory.catalog import Catalog, load_catalog
from factory.errors import FactoryError
from factory.routing import SCORERS, Router, RouteRequest, Scorer, make_scorer

SETS = Path(__file__).parent / "data" / "routing-sets.yaml"
# Decisions made before timing starts (caches, allocator arenas, CPU frequency settle).
WARM_UP_DECISIONS = 100


@dataclass(frozen=True)
class Task:
    expected: str
    text: str


@dataclass
class Result:
    scorer: str
    correct: int
    total: int
    p50_ms: float
    p99_ms: float
    prepare_s: float
    misses: list[tuple[Task, str]]
    sure: list[tuple[float, bool]] = dataclasses.field(default_factory=list)  # (confidence, right) per task

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def read_tasks(path: Path) -> list[Task]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = set(reader.fieldnames or [])
        if not {"expected", "description"} <= columns:
            raise SystemExit(
                f"{path}: needs tab-separated columns 'expected' and 'description' (has {sorted(columns)})"
            )
        return [Task(row["expected"].strip(), row["description"].strip()) for row in reader if row.get("description")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def measure(name: str, catalog: Catalog, tasks: list[Task], build: Callable[[], Scorer] | None = None) -> Result:
    start = time.perf_counter()
    router = Router(catalog, build() if build else make_scorer(name, catalog))
    prepare_s = time.perf_counter() - start
    warm_up = [e for agent in catalog.agents for e in agent.examples] or [a.description for a in catalog.agents]
    for i in range(max(WARM_UP_DECISIONS, len(warm_up))):  # the catalogue's own sentences, round and round
        router.route(RouteRequest(text=warm_up[i % len(warm_up)]))
    latencies: list[float] = []
    misses: list[tuple[Task, str]] = []
    sure: list[tuple[float, bool]] = []
    for task in tasks:
        t0 = time.perf_counter()
        decision = router.route(RouteRequest(text=task.text))
        latencies.append((time.perf_counter() - t0) * 1000.0)
        sure.append((decision.confidence, decision.agent == task.expected))
        if decision.agent != task.expected:
            misses.append((task, decision.agent))
    return Result(
        scorer=name,
        correct=len(tasks) - len(misses),
        total=len(tasks),
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p99_ms=percentile(latencies, 0.99),
        prepare_s=prepare_s,
        misses=misses,
        sure=sure,
    )


@dataclass(frozen=True)
class TaskSet:
    """A catalogue with its labelled tasks, and what it was used for (benchmarks/data/routing-sets.yaml)."""

    name: str
    agents: Path
    tasks: Path
    role: str  # "development" (it chose something) or "reporting" (it chose nothing)
    chose: str


def task_sets(manifest: Path = SETS) -> list[TaskSet]:
    import yaml

    data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    base = manifest.parent
    return [
        TaskSet(s["name"], (base / s["agents"]).resolve(), (base / s["tasks"]).resolve(), s["role"], s.get("chose", ""))
        for s in data["sets"]
    ]


def run_all(scorers: list[str], show_misses: bool = False, only_sets: list[str] | None = None) -> int:
    """Every set of the manifest (or ``only_sets``) with each scorer; the macro average over the
    development sets and, apart, over the reporting sets (the headline: they chose nothing)."""
    sets = [s for s in task_sets() if s.agents.is_file() and s.tasks.is_file()]
    if only_sets:
        sets = [s for s in sets if s.name in only_sets]
    table: dict[str, dict[str, Result]] = {}
    print(f"{'set':<10} {'role':<12} {'agents':>6} {'tasks':>6}  " + "  ".join(f"{n:>13}" for n in scorers))
    for task_set in sets:
        catalog = load_catalog(task_set.agents)
        tasks = read_tasks(task_set.tasks)
        row: dict[str, Result] = {}
        for name in scorers:
            try:
                row[name] = measure(name, catalog, tasks)
            except FactoryError as exc:
                print(f"{task_set.name}: {name} skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
        table[task_set.name] = row
        cells = "  ".join(
            f"{row[n].accuracy:>6.3f} {row[n].p50_ms:>4.1f}ms" if n in row else f"{'-':>13}" for n in scorers
        )
        print(f"{task_set.name:<10} {task_set.role:<12} {len(catalog.agents):>6} {len(tasks):>6}  {cells}")
        if show_misses:
            for name, result in row.items():
                for task, got in result.misses:
                    print(f"    {name} miss: expected {task.expected}, got {got}: {task.text}")
    for role in ("development", "reporting"):
        names = [s.name for s in sets if s.role == role]
        if not names:
            continue
        averages = []
        for scorer in scorers:
            values = [table[n][scorer].accuracy for n in names if scorer in table[n]]
            averages.append(f"{sum(values) / len(values):>13.3f}" if values else f"{'-':>13}")
        print(f"{'macro':<10} {role:<12} {'':>6} {'':>6}  " + "  ".join(averages) + f"   ({', '.join(names)})")
    print("development sets chose parameters (routing-sets.yaml says which); reporting sets chose nothing")
    print("\ncoverage: at each min_confidence, the share of decisions the router is sure of, and their accuracy")
    for scorer in scorers:
        print(f"{scorer:<10} " + " ".join(f"{f'>= {c:.1f}':>15}" for c in COVERAGE_LEVELS))
        for task_set in sets:
            measured = table[task_set.name].get(scorer)
            if measured is None:
                continue
            shown: list[str] = []
            for level in COVERAGE_LEVELS:
                kept = [right for confidence, right in measured.sure if confidence >= level]
                share = len(kept) / len(measured.sure) if measured.sure else 0.0
                accuracy = sum(kept) / len(kept) if kept else 0.0
                shown.append(f"{share:>6.2f} / {accuracy:>5.3f}")
            print(f"  {task_set.name:<8} " + " ".join(f"{c:>15}" for c in shown))
    return 0


COVERAGE_LEVELS = (0.0, 0.3, 0.5, 0.7, 0.9)
LEARNING_STEPS = (0, 1, 3, 5)
LEARNING_SEEDS = 3
LEARNING_FOLDS = 3


def _random_corrections(
    catalog: Catalog, tasks: list[Task], scorer: str, seed: int
) -> tuple[dict[int, float], list[float]]:
    """Protocol "random": k random tasks of each agent are taught (most of them already routed
    right: confirmations); accuracy on the tasks never used as corrections (the same at every k),
    and the latencies (ms) of the decisions made with the most corrections."""
    import random

    rng = random.Random(seed)
    by_agent: dict[str, list[Task]] = {}
    for task in tasks:
        by_agent.setdefault(task.expected, []).append(task)
    for group in by_agent.values():
        rng.shuffle(group)
    used = {id(t) for group in by_agent.values() for t in group[: max(LEARNING_STEPS)]}
    held_back = [t for t in tasks if id(t) not in used]
    router = Router(catalog, make_scorer(scorer, catalog))
    taught = 0
    accuracy: dict[int, float] = {}
    for k in LEARNING_STEPS:
        for group in by_agent.values():
            for task in group[taught:k]:
                router.learn(task.expected, task.text)
        taught = k
        hits = 0
        latencies = []
        for task in held_back:
            t0 = time.perf_counter()
            hits += router.route(RouteRequest(text=task.text)).agent == task.expected
            latencies.append((time.perf_counter() - t0) * 1000.0)
        accuracy[k] = hits / len(held_back)
    return accuracy, latencies


def _mistake_corrections(
    catalog: Catalog, tasks: list[Task], scorer: str, seed: int
) -> tuple[dict[int, float], dict[int, float]]:
    """Protocol "mistakes": the tasks, in a seeded random order, are split into LEARNING_FOLDS parts;
    for each part, the other parts are streamed through the router, and a task it routes wrong is
    corrected (``Router.learn``) while its right agent has fewer than k corrections; then the part,
    never used as a correction, is measured. Every task is measured once, so k = 0 is the set's
    plain accuracy. Returns the accuracy and the corrections made per stream, for each k."""
    import random

    order = list(tasks)
    random.Random(1000 + seed).shuffle(order)
    hits = dict.fromkeys(LEARNING_STEPS, 0)
    made = dict.fromkeys(LEARNING_STEPS, 0.0)
    for fold in range(LEARNING_FOLDS):
        measured = [t for i, t in enumerate(order) if i % LEARNING_FOLDS == fold]
        stream = [t for i, t in enumerate(order) if i % LEARNING_FOLDS != fold]
        for k in LEARNING_STEPS:
            router = Router(catalog, make_scorer(scorer, catalog))
            count: dict[str, int] = {}
            for task in stream:
                if count.get(task.expected, 0) >= k:
                    continue
                if router.route(RouteRequest(text=task.text)).agent != task.expected:
                    router.learn(task.expected, task.text)
                    count[task.expected] = count.get(task.expected, 0) + 1
            made[k] += sum(count.values()) / LEARNING_FOLDS
            hits[k] += sum(router.route(RouteRequest(text=t.text)).agent == t.expected for t in measured)
    return {k: hits[k] / len(tasks) for k in LEARNING_STEPS}, made


def learning_curve(scorer: str, only_sets: list[str] | None = None) -> int:
    """Accuracy after 0, 1, 3 and 5 corrections per agent (``Router.learn``), in two protocols,
    each the mean of LEARNING_SEEDS draws: "random" teaches k random tasks per agent (mostly
    confirmations of right decisions); "mistakes" corrects the mistakes of a stream of tasks, at
    most k per agent, as a person watching the decisions would. Both measure only tasks that were
    never used as corrections."""
    sets = [s for s in task_sets() if s.agents.is_file() and s.tasks.is_file()]
    if only_sets:
        sets = [s for s in sets if s.name in only_sets]
    steps = " ".join(f"{f'{k}/agent':>9}" for k in LEARNING_STEPS)
    print(f"learning curves ({scorer}): accuracy on tasks never used as corrections, mean of {LEARNING_SEEDS} draws")
    print("random:   k random tasks of each agent taught (mostly already right); the rest measured")
    print(
        f"mistakes: stream {LEARNING_FOLDS - 1}/{LEARNING_FOLDS} of the tasks, correct each wrong decision while "
        f"its agent has < k corrections, measure the other 1/{LEARNING_FOLDS} (every task once per draw)"
    )
    print(f"{'set':<10} {'role':<12} {'protocol':<9} {steps}   (mistakes: corrections made per stream)")
    for task_set in sets:
        catalog = load_catalog(task_set.agents)
        tasks = read_tasks(task_set.tasks)
        random_sums = dict.fromkeys(LEARNING_STEPS, 0.0)
        mistake_sums = dict.fromkeys(LEARNING_STEPS, 0.0)
        made_sums = dict.fromkeys(LEARNING_STEPS, 0.0)
        latencies: list[float] = []
        for seed in range(LEARNING_SEEDS):
            learnt, timed = _random_corrections(catalog, tasks, scorer, seed)
            latencies += timed
            for k, value in learnt.items():
                random_sums[k] += value / LEARNING_SEEDS
            accuracy, made = _mistake_corrections(catalog, tasks, scorer, seed)
            for k in LEARNING_STEPS:
                mistake_sums[k] += accuracy[k] / LEARNING_SEEDS
                made_sums[k] += made[k] / LEARNING_SEEDS
        label = f"{task_set.name:<10} {task_set.role:<12}"
        print(
            f"{label} {'random':<9} "
            + " ".join(f"{random_sums[k]:>9.3f}" for k in LEARNING_STEPS)
            + f"   decision p50 {statistics.median(latencies):.1f} ms at {max(LEARNING_STEPS)}/agent"
        )
        print(
            f"{label} {'mistakes':<9} "
            + " ".join(f"{mistake_sums[k]:>9.3f}" for k in LEARNING_STEPS)
            + "   "
            + " ".join(f"{made_sums[k]:.1f}" for k in LEARNING_STEPS)
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--all", action="store_true", help="every set of benchmarks/data/routing-sets.yaml, with the macro averages"
    )
    parser.add_argument("--sets", help="with --all: only these sets (comma-separated names)")
    parser.add_argument(
        "--learning",
        action="store_true",
        help="with --all: the learning curves over 0, 1, 3, 5 corrections per agent (random and mistakes protocols)",
    )
    parser.add_argument("--agents", type=Path, help="agent catalogue (agents.yaml)")
    parser.add_argument("--tasks", type=Path, help="TSV with columns expected, description")
    parser.add_argument("--scorer", default="lexical", choices=sorted(SCORERS), help="scorer of the last line")
    parser.add_argument("--only", action="store_true", help="measure only --scorer")
    parser.add_argument("--show-misses", action="store_true", help="list the misrouted tasks")
    parser.add_argument(
        "--ablation", action="store_true", help="also the embedding scorer without each of its parts, and on numpy"
    )
    args = parser.parse_args(argv)
    if args.all and args.learning:
        return learning_curve(args.scorer, args.sets.split(",") if args.sets else None)
    if args.all:
        scorers = [args.scorer] if args.only else ["lexical", "embedding"]
        return run_all(scorers, args.show_misses, args.sets.split(",") if args.sets else None)
    if args.agents is None or args.tasks is None:
        parser.error("give --agents and --tasks, or --all")

    catalog = load_catalog(args.agents)
    tasks = read_tasks(args.tasks)
    unknown = sorted({t.expected for t in tasks} - {a.name for a in catalog.agents})
    if unknown:
        print(f"warning: tasks expect agents not in the catalogue: {', '.join(unknown)}", file=sys.stderr)
    names = [args.scorer] if args.only else [args.scorer, *(n for n in SCORERS if n != args.scorer)]
    variants: dict[str, Callable[[], Scorer]] = {}
    if args.ablation:
        from factory.routing.embedding import EmbeddingScorer

        variants["emb-plain"] = lambda: EmbeddingScorer(catalog, lexical_weight=0.0, whiten=False)
        variants["emb-nowhiten"] = lambda: EmbeddingScorer(catalog, whiten=False)
        variants["emb-nolexical"] = lambda: EmbeddingScorer(catalog, lexical_weight=0.0)
        variants["emb-numpy"] = lambda: EmbeddingScorer(catalog, backend="numpy")
        names += list(variants)
    print(f"routing benchmark: {len(tasks)} tasks, {len(catalog.agents)} agents ({args.agents})")
    print(f"{'scorer':<13} {'accuracy':>8} {'correct':>9} {'p50 ms':>8} {'p99 ms':>8} {'prepare s':>10}")
    results: dict[str, Result] = {}
    for name in names:
        try:
            result = measure(name, catalog, tasks, variants.get(name))
        except FactoryError as exc:
            if name == args.scorer:
                print(f"error: scorer {name!r} cannot run: {exc}", file=sys.stderr)
                return 2
            print(f"{name:<13} skipped: {str(exc).splitlines()[0]}")
            continue
        results[name] = result
        print(
            f"{name:<13} {result.accuracy:>8.2f} {result.correct:>4}/{result.total:<4} "
            f"{result.p50_ms:>8.2f} {result.p99_ms:>8.2f} {result.prepare_s:>10.2f}"
        )
        if args.show_misses:
            for task, got in result.misses:
                print(f"    miss: expected {task.expected}, got {got}: {task.text}")
    if "embedding" in results:
        from factory.models.minilm import load_encoder

        print(f"embedding backend: {load_encoder().backend}")
    print(f"accuracy: {results[args.scorer].accuracy:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
