"""Shared benchmark plumbing: SmolLM2-135M-shaped random models, interleaved timing, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def smollm2_shaped(seed: int = 0, layers: int = 30):
    """A random LlamaForCausalLM with SmolLM2-135M's shapes (576 wide, 30 layers, 49k vocab, tied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each function `repeats` times, interleaved and in rotating order, so drift hits all alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], anchor: str) -> dict[str, dict[str, float]]:
    """Median seconds per variant and the ratio of medians to the anchor's."""
    base = statistics.median(times[anchor])
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "ratio": statistics.median(ts) / base,
               "repeats": len(ts)}
        for name, ts in times.items()
    }


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "malloc": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
