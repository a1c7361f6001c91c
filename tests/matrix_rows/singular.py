"""Singular-value-space rows: methods that train inside the SVD basis of the base weight."""

import deltatune.methods.kasa  # noqa: F401  (registration happens at import)
import deltatune.methods.salt  # noqa: F401
import deltatune.methods.spectral  # noqa: F401
import deltatune.methods.spectral_adapter  # noqa: F401
import deltatune.methods.svft  # noqa: F401

ROWS = [
    ("svf", "svf", {}),
    ("svfit", "svfit", {"r": 2}),
    ("svft", "svft", {"d": 1}),
    ("svft-plain", "svft", {"pattern": "plain"}),
    ("svft-random", "svft", {"pattern": "random", "d": 1, "r": 3, "seed": 3}),
    ("salt", "salt", {"r": 2, "lora_r": 2}),
    ("spectral_adapter", "spectral_adapter", {"r": 2}),
    ("kasa", "kasa", {"r": 2, "alpha": 4, "bias": "lora_only"}),
]
