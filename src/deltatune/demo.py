"""`deltatune demo`: a small end-to-end run of the library on a tiny random Llama, in seconds, on CPU.

The task: continue a counting sequence (token t+1 = token t + step mod vocab). A random model guesses (accuracy ~1/vocab);
a rank-8 LoRA on the attention and MLP projections learns it. The run prints accuracy before and after, checks that
merging gives the same outputs, and saves the adapter in PEFT's format. (The full demo on SmolLM2-135M arrives with
the training recipes.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import core  # noqa: F401
from .core import api
from .core.io import check_output_dir, save
from .core.registry import config
from .optim import param_groups

VOCAB = 32


def _batch(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


def _accuracy(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, 2:-1]  # two tokens reveal the step
    return (logits.argmax(-1) == ids[:, 3:]).float().mean().item()


def run_demo(out_dir: str | Path = "demo-output", steps: int = 150, seed: int = 0) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    check_output_dir(Path(out_dir) / "adapter")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    gen = torch.Generator().manual_seed(seed)
    held_out = _batch(torch.Generator().manual_seed(seed + 1), 64, 16)
    before = _accuracy(model, held_out)
    api.attach(model, config("lora", r=8, alpha=16, targets="all-linear"))
    n_train = sum(p.numel() for p in api.trainable_parameters(model))
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: tiny random Llama, {n_total:,} parameters; LoRA r=8 all-linear trains {n_train:,}")
    print(f"held-out next-token accuracy before: {before:.1%}")
    opt = torch.optim.AdamW(param_groups(model, lr=2e-3, lora_plus_ratio=4))
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ids = _batch(gen, 32, 16)
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    after = _accuracy(model, held_out)
    print(f"held-out next-token accuracy after {steps} steps ({time.perf_counter() - t0:.1f}s): {after:.1%}")
    with torch.no_grad():
        unmerged = model(held_out).logits
        api.merge(model)
        merged = model(held_out).logits
        api.unmerge(model)
    gap = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged max |Δlogit|: {gap:.2e}")
    path = save(model, Path(out_dir) / "adapter")
    print(f"adapter saved to {path} (PEFT layout: adapter_config.json + adapter_model.safetensors)")
    return {"before": before, "after": after, "merge_gap": gap}
