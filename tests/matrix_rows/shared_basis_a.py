"""Shared-basis low-rank rows: VeRA, VB-LoRA, RandLoRA, NOLA (adapter-wide random bases or a trained vector bank)."""

import deltatune.methods.nola  # noqa: F401  (registration happens at import)
import deltatune.methods.randlora  # noqa: F401
import deltatune.methods.vblora  # noqa: F401
import deltatune.methods.vera  # noqa: F401

ROWS = [
    ("vera", "vera", {"r": 6, "d_initial": 0.5}),
    ("vera-seeded", "vera", {"r": 4, "save_projection": False, "projection_prng_key": 3}),
    ("vblora", "vblora", {"r": 3, "num_vectors": 8, "vector_length": 4, "topk": 2, "init_vector_bank_bound": 0.5}),
    ("vblora-topk", "vblora", {"r": 2, "num_vectors": 6, "vector_length": 3, "topk": 3, "init_vector_bank_bound": 0.5,
                             "save_only_topk_weights": True}),
    ("randlora", "randlora", {"r": 3, "alpha": 6.0}),
    ("randlora-sparse", "randlora", {"r": 4, "alpha": 4.0, "bases": "sparse", "save_projection": False}),
    ("nola", "nola", {"r": 3, "num_bases_a": 5, "num_bases_b": 7, "alpha": 6.0}),
]
