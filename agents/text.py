"""Text agents: an extractive summariser and a classifier whose labels come from its config."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents._text import content_terms, sentences, surface_forms, words
from factory.agent import Agent

# -- summariser ---------------------------------------------------------------------------------


class SummarizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_sentences: int = Field(default=3, ge=1, description="Sentences in the summary unless the task asks.")
    keywords: int = Field(default=5, ge=0, description="Key terms returned with the summary.")
    redundancy: float = Field(
        default=0.5, gt=0, le=1, description="Skip a sentence sharing more than this share of terms with one taken."
    )


class SummarizeTask(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1, description="The document to summarise.")
    sentences: int | None = Field(default=None, ge=1, description="How many sentences (default from config).")
    title: str = Field(default="", description="Optional title: its terms weigh more.")


class Summary(BaseModel):
    summary: str
    sentences: list[str]
    keywords: list[str]
    source_sentences: int
    compression: float = Field(description="Words in the summary / words in the document.")


class Summarizer(Agent):
    """Condense long documents into short abstracts and key points (extractive)."""

    name = "summarizer"
    capabilities = ("summarize",)
    description = (
        "Condense long documents, articles, reports and meeting notes into a short abstract: "
        "the key sentences and key points, plus the main keywords."
    )
    examples = (
        "Summarize this article in three sentences.",
        "Give me the key points of this report.",
        "Write a short abstract of these meeting notes.",
        "TL;DR of this long document, please.",
    )
    config_model = SummarizerConfig
    task_model = SummarizeTask
    config: SummarizerConfig

    def handle(self, task: SummarizeTask) -> Summary:
        found = sentences(task.text)
        wanted = task.sentences or self.config.max_sentences
        terms_per_sentence = [content_terms(s) for s in found]
        frequency = Counter(t for terms in terms_per_sentence for t in terms)
        title_terms = set(content_terms(task.title))
        top = max(frequency.values(), default=1)
        # document frequency of a term across sentences: very common terms say less about a sentence
        spread = Counter(t for terms in terms_per_sentence for t in set(terms))
        n = len(found)

        def weight(term: str) -> float:
            idf = math.log(1 + n / spread[term]) if n > 1 else 1.0
            return (frequency[term] / top) * idf * (2.0 if term in title_terms else 1.0)

        scores = []
        for index, terms in enumerate(terms_per_sentence):
            if not terms:
                scores.append(0.0)
                continue
            unique = set(terms)
            centrality = sum(weight(t) for t in unique) / math.sqrt(len(unique))
            position = 1.15 if index == 0 else (1.05 if index < 3 else 1.0)
            too_short = 0.6 if len(terms) < 4 else 1.0
            prose = 1.0 if found[index].rstrip("\"')]").endswith((".", "!", "?")) else 0.3  # not a table row
            scores.append(centrality * position * too_short * prose)

        chosen: list[int] = []
        for index in sorted(range(n), key=lambda i: -scores[i]):
            if len(chosen) >= wanted:
                break
            unique = set(terms_per_sentence[index])
            if not unique:
                continue
            if any(len(unique & set(terms_per_sentence[j])) / len(unique) > self.config.redundancy for j in chosen):
                continue
            chosen.append(index)
        picked = [found[i] for i in sorted(chosen)]
        forms = surface_forms(task.text)
        keywords = [
            forms.get(term, term)
            for term, _ in sorted(frequency.items(), key=lambda kv: (-weight(kv[0]) * kv[1], kv[0]))
            if len(term) > 2
        ][: self.config.keywords]
        total_words = max(len(words(task.text)), 1)
        summary = " ".join(picked)
        return Summary(
            summary=summary,
            sentences=picked,
            keywords=keywords,
            source_sentences=n,
            compression=round(len(words(summary)) / total_words, 4),
        )


# -- classifier ---------------------------------------------------------------------------------


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    keywords: list[str] = Field(default_factory=list, description="Words or phrases that point to this label.")
    examples: list[str] = Field(default_factory=list, description="Sample texts with this label.")


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: list[Label] = Field(min_length=2, description="The labels to choose from (at least two).")
    fallback: str | None = Field(default=None, description="Label given when nothing fits (score under threshold).")
    threshold: float = Field(default=0.05, ge=0, description="Best score under this gives the fallback label.")

    @field_validator("labels", mode="before")
    @classmethod
    def _from_mapping(cls, value: Any) -> Any:
        """Accept ``{label: description}`` or ``{label: {keywords: [...], ...}}`` as well as a list."""
        if isinstance(value, dict):
            return [
                {"name": name, **(spec if isinstance(spec, dict) else {"description": str(spec or "")})}
                for name, spec in value.items()
            ]
        return value


class ClassifyTask(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1, description="The text to classify.")


class Classification(BaseModel):
    label: str
    confidence: float = Field(description="The winner's share of the positive scores (0..1).")
    scores: dict[str, float]
    matched: list[str] = Field(description="Label keywords found in the text.")


class Classifier(Agent):
    """Sort a text into one of the labels given in the config (keywords, descriptions, examples)."""

    name = "classifier"
    capabilities = ("classify",)
    description = (
        "Classify or categorise a text into one of a fixed set of labels: tag support tickets, triage e-mails, "
        "detect the topic or intent of a message."
    )
    examples = (
        "Classify this support ticket as billing, technical or account.",
        "Which category does this e-mail belong to?",
        "Tag this message with its topic.",
    )
    config_model = ClassifierConfig
    task_model = ClassifyTask
    config: ClassifierConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        labels = self.config.labels
        self._keywords = {
            label.name: [tuple(content_terms(k)) for k in label.keywords if content_terms(k)] for label in labels
        }
        bags = {
            label.name: Counter(
                content_terms(" ".join([label.name.replace("_", " "), label.description, *label.examples]))
            )
            for label in labels
        }
        # a term found in many labels' texts tells little: inverse label frequency
        label_count = len(labels)
        spread = Counter(t for bag in bags.values() for t in bag)
        self._idf = {t: math.log(1 + label_count / c) for t, c in spread.items()}
        self._vectors = {name: self._unit({t: c * self._idf[t] for t, c in bag.items()}) for name, bag in bags.items()}

    @staticmethod
    def _unit(vector: dict[str, float]) -> dict[str, float]:
        norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
        return {t: v / norm for t, v in vector.items()}

    def handle(self, task: ClassifyTask) -> Classification:
        terms = content_terms(task.text)
        counts = Counter(terms)
        query = self._unit({t: (1 + math.log(c)) * self._idf.get(t, 0.0) for t, c in counts.items()})
        scores: dict[str, float] = {}
        matched: list[str] = []
        for label in self.config.labels:
            vector = self._vectors[label.name]
            similarity = sum(w * vector.get(t, 0.0) for t, w in query.items())
            hits = 0
            for phrase in self._keywords[label.name]:
                if any(tuple(terms[i : i + len(phrase)]) == phrase for i in range(len(terms) - len(phrase) + 1)):
                    hits += 1
                    matched.append(f"{label.name}:{' '.join(phrase)}")
            scores[label.name] = round(similarity + 0.25 * hits, 6)
        best = max(scores, key=lambda name: scores[name])
        positive = sum(max(s, 0.0) for s in scores.values())
        confidence = scores[best] / positive if positive > 0 else 0.0
        chosen = best
        if scores[best] < self.config.threshold and self.config.fallback is not None:
            chosen, confidence = self.config.fallback, 0.0
        return Classification(label=chosen, confidence=round(confidence, 4), scores=scores, matched=matched)
