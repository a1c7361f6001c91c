"""Evaluation: loss / perplexity, exact match of greedy generations, and classification accuracy."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .data import Example, collate
from .loss import causal_lm_loss, classification_loss

DEFAULT_METRICS = {
    "prompt_completion": ["loss", "perplexity", "exact_match"],
    "chat": ["loss", "perplexity", "exact_match"],
    "text": ["loss", "perplexity"],
    "classification": ["loss", "accuracy"],
}


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64,
             batch_size: int = 16, autocast=contextlib.nullcontext) -> list[str]:
    """Greedy continuations of tokenised prompts (left-padded batches), decoded without special tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(model, tokenizer),
                              pad_token_id=tokenizer.pad_token_id)
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        longest = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(chunk):
            ids[i, longest - len(prompt):] = torch.tensor(prompt)
            mask[i, longest - len(prompt):] = 1
        with autocast():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        answers += [tokenizer.decode(row[longest:], skip_special_tokens=True).strip() for row in out]
    return answers


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: list[Example], *, metrics: list[str], batch_size: int = 16,
             max_new_tokens: int = 64, loss_chunk: int = 512, autocast=contextlib.nullcontext) -> dict:
    """The requested metrics on held-out examples."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        if any(m in metrics for m in ("loss", "perplexity", "accuracy")):
            total, count, correct = 0.0, 0, 0
            for start in range(0, len(examples), batch_size):
                batch = collate([[e] for e in examples[start:start + batch_size]], tokenizer.pad_token_id)
                with autocast():
                    if "class_labels" in batch:
                        loss, n, right = classification_loss(model, batch)
                        correct += right
                    else:
                        loss, n = causal_lm_loss(model, batch, chunk=loss_chunk)
                total, count = total + float(loss), count + n
            if "loss" in metrics or "perplexity" in metrics:
                out["loss"] = total / max(count, 1)
            if "perplexity" in metrics:
                out["perplexity"] = math.exp(min(out["loss"], 50.0))
            if "accuracy" in metrics:
                out["accuracy"] = correct / max(count, 1)
        if "exact_match" in metrics:
            scored = [e for e in examples if e.prompt_ids is not None and e.reference is not None]
            answers = generate(model, tokenizer, [e.prompt_ids for e in scored], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, autocast=autocast)
            hits = sum(a == e.reference.strip() for a, e in zip(answers, scored))
            out["exact_match"] = hits / max(len(scored), 1)
            out["samples"] = [{"reference": e.reference, "answer": a} for e, a in zip(scored[:3], answers[:3])]
    finally:
        model.train(was_training)
    return out
