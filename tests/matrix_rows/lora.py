"""LoRA family rows."""

ROWS = [
    ("lora", "lora", {"r": 4, "alpha": 8}),
    ("lora-bias", "lora", {"r": 3, "alpha": 6, "lora_bias": True, "bias": "lora_only", "exclude": ["emb", "embed_tokens"]}),
    ("lora-pattern", "lora", {"r": 2, "rank_pattern": {".*1": 5}, "alpha_pattern": {".*1": 3.0}}),
    ("rslora", "rslora", {"r": 4, "alpha": 8}),
    ("dora", "dora", {"r": 4, "alpha": 8, "bias": "lora_only"}),
]
