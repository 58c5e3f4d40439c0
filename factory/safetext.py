"""Text from outside (a provider's error, a tool's arguments or result) made fit for errors and events:
on one line, cut to a limit, with anything that looks like a key or a bearer token replaced by
``[redacted]`` (and the user:password part of URLs). Pure."""

from __future__ import annotations

import re

_SECRETISH = re.compile(
    r"(?i)\b(sk-[A-Za-z0-9_-]{6,}|AIza[0-9A-Za-z_-]{20,}|bearer\s+[A-Za-z0-9._~+/-]{6,}"
    r"|(?:x-goog-api-key|api[_-]?key)[\"']?\s*[=:]\s*\S+)"
)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def one_line(error: object, limit: int = 500) -> str:
    """A message on one line, cut to ``limit``, with anything that looks like a key removed."""
    text = _URL_USERINFO.sub("[redacted]@", _SECRETISH.sub("[redacted]", " ".join(str(error).split())))
    return text if len(text) <= limit else text[: limit - 3] + "..."
