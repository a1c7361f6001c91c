"""Training-trick rows: LoRA Dropout (column / row dropout of the factors)."""

import deltatune.methods.lora_dropout  # noqa: F401

ROWS = [
    ("lora_dropout", "lora_dropout", {"r": 2, "alpha": 4.0, "param_dropout": 0.2}),
]
