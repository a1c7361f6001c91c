"""Shared fixtures for the merge tests: tiny random Llama checkpoints on disk and a mergekit runner."""

from __future__ import annotations

import pytest
import torch


def save_tiny_llama(directory, seed: int, *, tied: bool = False, layers: int = 2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norms start at exactly 1 in every model; make them differ like trained ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three tiny untied float32 Llama checkpoints: [base, model1, model2]."""
    root = tmp_path_factory.mktemp("tiny_models")
    return [str(save_tiny_llama(root / f"m{i}", seed=i)) for i in range(3)]


def run_mergekit(raw: dict, out) -> None:
    pytest.importorskip("mergekit", reason="the parity tests compare with mergekit: pip install mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(raw), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


@pytest.fixture(autouse=True)
def one_thread():
    """The merge tests run many small tensor ops; on a busy 2-core machine OpenMP's spinning threads make each one
    cost milliseconds, so these tests use one thread (restored after each test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
