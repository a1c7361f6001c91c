"""LoRA initialisation rows (the inits that start A and B non-zero and keep a frozen offset) and LoRA-SB."""

import deltatune.methods.lora_sb  # noqa: F401

ROWS = [
    ("lora-pissa", "lora", {"r": 2, "alpha": 4, "init": "pissa"}),
    ("lora-olora", "lora", {"r": 2, "alpha": 4, "init": "olora"}),
    ("lora-nlora", "lora", {"r": 2, "alpha": 4, "init": "nlora", "init_options": {"seed": 1}}),
    ("lora-loftq", "lora", {"r": 2, "alpha": 4, "init": "loftq", "init_options": {"block_size": 8}}),
    ("rslora-corda", "rslora", {"r": 2, "alpha": 4, "init": "corda_ipm"}),
    ("dora-milora", "dora", {"r": 2, "alpha": 4, "init": "milora"}),
    ("lora_sb", "lora_sb", {"r": 2, "alpha": 4}),
]
