"""Shared set-up for training tests: a tiny random Llama with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

DEMO = Path(__file__).parents[1] / "src" / "deltatune" / "train" / "demo_data"


def make_tiny_llama(directory: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.train.models import model_directory

    tokenizer = AutoTokenizer.from_pretrained(model_directory("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def demo_rows(split: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]]


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path
