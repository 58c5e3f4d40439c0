"""The Factory's built-in agents: real, offline, no model downloads.

- :class:`agents.text.Summarizer`: extractive summary (the most central sentences, in order) and keywords.
- :class:`agents.text.Classifier`: sorts a text into labels given in its config.
- :class:`agents.extract.FieldExtractor`: invoice and e-mail fields (numbers, dates, amounts, parties) to JSON.
- :class:`agents.code.CodeRunner`: runs a snippet of code in the isolated executor (factory.sandbox).

Use them from ``agents.yaml`` (``class: agents.text:Summarizer``) or in Python.
"""

from agents.code import CodeRunner
from agents.extract import FieldExtractor
from agents.text import Classifier, Summarizer

__all__ = ["Classifier", "CodeRunner", "FieldExtractor", "Summarizer"]
