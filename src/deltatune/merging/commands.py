"""Subcommands of the merging package (registered on the `deltatune` parser by cli.py)."""

from __future__ import annotations


def add_commands(sub) -> None:
    """Register this package's subcommands on the `deltatune` parser."""
