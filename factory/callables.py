"""Importing step functions named as ``module:function``."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from factory.errors import StepInputError

_cache: dict[str, Callable[..., Any]] = {}


def add_search_path(paths: Sequence[str]) -> None:
    for path in paths:
        if path and path not in sys.path:
            sys.path.insert(0, path)


def import_callable(target: str, search_path: Sequence[str] = ()) -> Callable[..., Any]:
    """Import ``module:function``; raises ImportError or AttributeError/TypeError with a clear message."""
    found = _cache.get(target)
    if found is not None:
        return found
    add_search_path(search_path)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r}: {exc}") from exc
    func = getattr(module, attr, None)
    if func is None:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(func):
        raise TypeError(f"{target} is a {type(func).__name__}, not a function")
    _cache[target] = func
    return func  # type: ignore[no-any-return]


def check_arguments(func: Callable[..., Any], names: set[str], target: str) -> list[str]:
    """Problems with calling ``func`` with keyword arguments ``names``."""
    try:
        signature = signature_of(func)
    except (TypeError, ValueError):
        return []
    params = signature.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    problems: list[str] = []
    if not takes_kwargs:
        for name in sorted(names - accepted):
            problems.append(
                f"{target}() has no parameter {name!r} (it takes: {', '.join(sorted(accepted)) or 'nothing'})"
            )
    for name, p in params.items():
        if (
            p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and name not in names
        ):
            problems.append(f"{target}() needs argument {name!r}: add it under `with`")
    return problems


@functools.lru_cache(maxsize=1024)
def _cached_signature(func: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(func)


def signature_of(func: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(func)``, kept per function (a step's function is bound at every attempt)."""
    try:
        return _cached_signature(func)
    except TypeError:  # not hashable: computed each time (inspect's own TypeErrors come back the same)
        return inspect.signature(func)


def bind_arguments(func: Callable[..., Any], kwargs: dict[str, Any], target: str) -> None:
    """Raise StepInputError when ``kwargs`` do not fit the signature (before calling it)."""
    try:
        signature_of(func).bind(**kwargs)
    except TypeError as exc:
        raise StepInputError(f"{target}(): {exc}") from exc
    except ValueError:
        return
