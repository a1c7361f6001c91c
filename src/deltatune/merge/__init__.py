"""Merging and arithmetic: merge methods as pure tensor functions, full-model merges out of core, and adapter
arithmetic, conversion, extraction, export and compression."""
