"""Orthogonal / multiplicative family rows: OFT, BOFT, HRA, ETHER, ETHER+, QR-LoRA."""

import deltatune.methods.boft  # noqa: F401
import deltatune.methods.ether  # noqa: F401
import deltatune.methods.hra  # noqa: F401
import deltatune.methods.oft  # noqa: F401
import deltatune.methods.qr_lora  # noqa: F401

ROWS = [
    ("oft", "oft", {"block_size": 4}),
    ("oft-neumann-share", "oft", {"r": 2, "block_size": 0, "cayley_neumann": True, "block_share": True}),
    ("oft-coft", "oft", {"block_size": 4, "coft": True, "eps": 0.5}),
    ("boft", "boft", {"block_size": 0, "block_num": 1}),
    ("hra", "hra", {"r": 2}),
    ("ether", "ether", {"n_blocks": 1}),
    ("ether_plus", "ether_plus", {"n_blocks": 1}),
    ("ether_plus-one-sided", "ether_plus", {"n_blocks": 1, "two_sided": False}),
    ("qr_lora", "qr_lora", {"r": 2, "alpha": 4}),
]
