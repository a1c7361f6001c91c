"""Dense delta (full fine-tuning of chosen modules)."""

ROWS = [
    ("full", "full", {}),
]
