"""Close matches for a mistyped name, for error messages ("did you mean 'botorch'?")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(names: Iterable[object], allowed: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed name to each of ``names``, or ``""``."""
    allowed = [str(a) for a in allowed]
    close = []
    for name in names:
        match = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
        if match and match[0] not in close:
            close.append(match[0])
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
