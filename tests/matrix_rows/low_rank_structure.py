"""Low-rank structure variants: single-matrix, LDU, square high-rank, dense, nested, multi-scale, parallel, two-branch."""

import deltatune.methods.denselora  # noqa: F401  (registration happens at import)
import deltatune.methods.hydra  # noqa: F401
import deltatune.methods.loldu  # noqa: F401
import deltatune.methods.mora  # noqa: F401
import deltatune.methods.msplora  # noqa: F401
import deltatune.methods.multilora  # noqa: F401
import deltatune.methods.nora  # noqa: F401
import deltatune.methods.singlora  # noqa: F401

ROWS = [
    ("singlora", "singlora", {"r": 3, "alpha": 3.0, "ramp_steps": 0}),
    ("loldu", "loldu", {"r": 3, "alpha": 1.0}),
    ("mora", "mora", {"r": 2}),
    ("mora-sharing", "mora", {"r": 2, "operator": "sharing"}),
    ("denselora", "denselora", {"r": 4, "alpha": 8.0}),
    ("nora", "nora", {"r": 3, "inner_r": 2, "alpha": 2.0}),
    ("msplora", "msplora", {"r_global": 4, "r_mid": 2, "r_layer": 1, "mid_group_size": 1, "alpha": 4.0}),
    ("multilora", "multilora", {"r": 2, "n": 3}),
    ("hydra", "hydra", {"r": 2, "scale": 1.0}),
]
