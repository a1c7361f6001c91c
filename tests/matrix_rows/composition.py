"""Composition methods."""

ROWS = [
    ("fusion", "fusion", {"temperature": 2.0}),
]
