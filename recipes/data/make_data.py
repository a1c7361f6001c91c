"""Regenerates the small example datasets of recipes/ (deterministic; the .jsonl files are committed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
POSITIVE = ["loved", "enjoyed", "adored", "was delighted by", "would recommend", "was thrilled with"]
NEGATIVE = ["hated", "regretted", "was bored by", "would not recommend", "was disappointed by", "could not stand"]
THINGS = ["the film", "this phone", "the hotel", "our dinner", "the concert", "that novel", "the new album",
          "the museum tour", "this laptop", "the coffee shop", "the play", "the hiking trail"]
WORDS = ["river", "lantern", "quiet", "orange", "bridge", "marble", "winter", "candle", "silver", "garden",
         "violet", "harbor", "thunder", "meadow", "pepper", "window", "copper", "falcon", "cedar", "ember"]


def sentiment(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        verb = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append({"text": f"I {verb} {rng.choice(THINGS)}.", "label": label})
    return rows


def uppercase(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        words = " ".join(rng.sample(WORDS, rng.randint(2, 5)))
        rows.append({"prompt": f"Rewrite in capital letters: {words}\nAnswer:", "completion": f" {words.upper()}"})
    return rows


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    rng = random.Random(0)
    write("sentiment_train.jsonl", sentiment(rng, 200))
    write("sentiment_eval.jsonl", sentiment(rng, 40))
    write("uppercase_train.jsonl", uppercase(rng, 300))
    write("uppercase_eval.jsonl", uppercase(rng, 30))
