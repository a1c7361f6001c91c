"""The one exception type deltatune raises for bad input.

Every message says what is wrong, where, and how to fix it, on one line, so the CLI can print it as is.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeltatuneError(ValueError):
    """Bad input to deltatune: a config, a model, a file or a call that cannot be honoured."""


def closest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates nearest to `word`, for 'did you mean' hints."""
    pool = sorted(set(candidates))
    near = difflib.get_close_matches(word, pool, n=n, cutoff=0.4)
    return near or pool[:n]


def one_of(what: str, value: object, valid: Iterable[str]) -> DeltatuneError:
    """An error for a value outside a known set, listing the valid ones."""
    valid = sorted(valid)
    return DeltatuneError(f"unknown {what} {value!r}; valid: {', '.join(valid) or '(none)'}")
