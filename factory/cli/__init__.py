"""The ``factory`` command line.

Commands (:mod:`factory.cli.runs`, ``keys``, ``workflows``, ``agents``, ``sandbox``, and
``up``/``down`` from :mod:`deployments.cli`) work on a :class:`~factory.cli.backend.Backend`:
this machine's state (:mod:`factory.cli.local`) or, with ``--api URL``, the Factory's HTTP
API (:mod:`factory.cli.remote`).
"""

from factory.cli.app import app, main
from factory.cli.runs import parse_inputs

__all__ = ["app", "main", "parse_inputs"]
