"""Structured / spectral rows: LoHa, LoKr, FourierFT, C³A, MiSS, LoTR, LoRETTA, FLoRA."""

import deltatune.methods.c3a  # noqa: F401
import deltatune.methods.flora  # noqa: F401
import deltatune.methods.fourierft  # noqa: F401
import deltatune.methods.loha  # noqa: F401
import deltatune.methods.lokr  # noqa: F401
import deltatune.methods.loretta  # noqa: F401
import deltatune.methods.lotr  # noqa: F401
import deltatune.methods.miss  # noqa: F401

# Block sizes that divide every toy layer: 2 in general, 1 or 3 where a side is odd.
_C3A_BLOCKS = {"lin2": 1, "conv2d": 3, "conv1d": 1, "head": 1}

ROWS = [
    ("loha", "loha", {"r": 2, "alpha": 4}),
    ("loha-cp", "loha", {"r": 2, "alpha": 4, "use_effective_conv2d": True, "rank_pattern": {"head": 3}}),
    ("lokr", "lokr", {"r": 2, "alpha": 4}),
    ("lokr-both", "lokr", {"r": 1, "decompose_both": True, "decompose_factor": 2,
                           "use_effective_conv2d": True}),
    ("fourierft", "fourierft", {"n_frequency": 6, "alpha": 2.0}),
    ("c3a", "c3a", {"block_size": 2, "block_size_pattern": _C3A_BLOCKS}),
    ("miss", "miss", {"r": 2}),
    ("miss-mini", "miss", {"r": 3, "init": "mini", "mini_r": 1}),
    ("miss-bat", "miss", {"r": 1, "init": "bat"}),
    ("lotr", "lotr", {"r": 2, "alpha": 2.0}),
    ("lotr-by-name", "lotr", {"r": 1, "share_by": "name"}),
    ("loretta", "loretta", {"r": 2, "tt_rank": 2, "mode_size": 4}),
    ("flora", "flora", {"r": 2, "kernel_r": 2, "scale": 2.0}),
]
