"""Helpers for the analysis tests (a module of its own: several test directories have a conftest.py)."""

from __future__ import annotations

import hashlib

import torch
from toys import make, perturb

import deltatune


class HashEmbedder:
    """Bag-of-words embedding by hashing (unit rows): fast, deterministic, and word overlap means similarity."""

    name = "test/hash-bag-of-words"

    def __call__(self, texts):
        rows = []
        for text in texts:
            vector = torch.zeros(128)
            for word in text.lower().replace(",", " ").replace(":", " ").split():
                vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 128] += 1.0
            rows.append(vector / vector.norm().clamp(min=1e-9))
        return torch.stack(rows)


def save_toy_adapter(directory, method: str = "lora", seed: int = 0, scale: float = 0.3, name: str = "x",
                     targets=("q_proj", "v_proj"), **fields):
    """A non-identity adapter of `method` on the toy Llama, saved to `directory`; returns the directory."""
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config(method, targets=list(targets), **fields), name=name)
    perturb(model, name, seed, scale)
    deltatune.save(model, directory, name=name)
    return directory
