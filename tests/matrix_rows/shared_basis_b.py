"""Rows for methods with frozen, shared or weight-derived bases: LoRA-XS, MoS, LoRI, PMSS."""

import deltatune.methods.lora_xs  # noqa: F401
import deltatune.methods.lori  # noqa: F401
import deltatune.methods.mos  # noqa: F401
import deltatune.methods.pmss  # noqa: F401

ROWS = [
    ("lora_xs", "lora_xs", {"r": 3, "alpha": 6}),
    ("mos", "mos", {"r": 2, "alpha": 4, "equivalent_rank": 2, "private_rank": 1, "shards_per_vector": 2}),
    ("lori", "lori", {"r": 3, "alpha": 6, "sparsity": 0.5}),
    ("pmss", "pmss", {"r": 3}),
]
