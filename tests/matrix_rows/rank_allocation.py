"""Rank-allocation and schedule rows: AdaLoRA, IncreLoRA, ElaLoRA, DyLoRA, SoRA, PRILoRA, AFLoRA, COLA."""

import deltatune.methods.adalora
import deltatune.methods.aflora
import deltatune.methods.cola
import deltatune.methods.dylora
import deltatune.methods.prilora
import deltatune.methods.rank_growth
import deltatune.methods.sora  # noqa: F401

ROWS = [
    ("adalora", "adalora", {"init_r": 3, "target_r": 2, "alpha": 4.0}),
    ("increlora", "increlora", {"init_r": 1, "target_r": 2, "max_r": 3}),
    ("elalora", "elalora", {"init_r": 2, "max_r": 3, "change": 1}),
    ("dylora", "dylora", {"r": 3, "alpha": 6.0}),
    ("dylora-all", "dylora", {"r": 3, "alpha": 6.0, "update": "all", "eval_rank": 2}),
    ("sora", "sora", {"r": 3, "alpha": 6.0}),
    ("prilora", "prilora", {"r": 3, "r_min": 1, "num_layers": 2, "alpha": 4.0}),
    ("aflora", "aflora", {"r": 2}),
    ("cola", "cola", {"r": 2, "alpha": 4.0, "links": 2}),
]
