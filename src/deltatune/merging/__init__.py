"""Merging and arithmetic: merge methods as pure tensor functions, full-model merges out of core, and adapter
arithmetic, conversion, extraction, export and compression.

The package is `merging`, not `merge`: a subpackage named `merge` would replace the function `deltatune.merge` as an
attribute of the `deltatune` package as soon as it is imported.
"""
