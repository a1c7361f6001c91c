"""Low-rank variant rows: GraLoRA, LoRMA, ABBA, HiRA, DeLoRA, BoRA, EDoRA."""

import deltatune.methods.abba  # noqa: F401
import deltatune.methods.bora  # noqa: F401
import deltatune.methods.delora  # noqa: F401
import deltatune.methods.edora  # noqa: F401
import deltatune.methods.gralora  # noqa: F401
import deltatune.methods.hira  # noqa: F401
import deltatune.methods.lorma  # noqa: F401

# The toys' 3-wide output heads (mlp lin2, conv head) are not divisible by k = 2: plain blocks there.
_ODD_HEADS = {"lin2": 1, "head": 1}

ROWS = [
    ("gralora", "gralora", {"r": 4, "alpha": 8, "k": 2, "k_pattern": _ODD_HEADS}),
    ("gralora-hybrid", "gralora", {"r": 2, "alpha": 4, "k": 2, "hybrid_r": 2, "k_pattern": _ODD_HEADS}),
    ("lorma", "lorma", {"r": 2, "alpha": 2}),
    ("lorma-pi", "lorma", {"r": 2, "alpha": 4, "variant": "pi"}),
    ("abba", "abba", {"r1": 2, "r2": 2, "alpha": 2}),
    ("hira", "hira", {"r": 2}),
    ("delora", "delora", {"r": 2, "delora_lambda": 2.0}),
    ("bora", "bora", {"r": 2, "alpha": 4}),
    ("edora", "edora", {"r": 2, "alpha": 2}),
]
