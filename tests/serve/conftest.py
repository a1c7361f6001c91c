"""Shared set-up for the serving tests: a tiny random Llama (SmolLM2's tokenizer and chat template) and a root
directory of random LoRA / (IA)³ adapters saved in PEFT's layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import make_tiny_llama

import deltatune

LORA_NAMES = ("a0", "a1", "a2")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def adapter_root(tiny_dir, tmp_path_factory) -> Path:
    from deltatune.train.models import load_model

    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_model(str(tiny_dir))
    for i, name in enumerate(LORA_NAMES):
        torch.manual_seed(100 + i)
        deltatune.attach(model, deltatune.config("lora", r=4, alpha=8, targets="all-linear", init="random"), name)
        deltatune.save(model, root / name, name=name)
    torch.manual_seed(7)
    deltatune.attach(model, deltatune.config("ia3", targets=["k_proj", "v_proj", "o_proj", "down_proj"]), "ia3")
    with torch.no_grad():  # (IA)³ starts at identity; move it away so that it changes the output
        for pname, p in deltatune.named_trainable_parameters(model):
            if ".ia3." in pname:
                p.add_(torch.randn_like(p) * 2.0)
    deltatune.save(model, root / "ia3", name="ia3")
    return root


@pytest.fixture
def make_engine(tiny_dir, adapter_root):
    """Engines over the tiny model; all are stopped at the end of the test."""
    from deltatune.serve.adapters import AdapterStore
    from deltatune.serve.engine import Engine
    from deltatune.train.interactive import load_for_inference

    made = []

    def make(precision: str = "fp32", max_loaded: int = 8, max_batch: int = 8, **kwargs):
        """precision: fp32, bf16, or either with "+int8" (int8 base weights, as `serve --int8`)."""
        precision, _, int8 = precision.partition("+")
        model, tokenizer, autocast = load_for_inference(str(tiny_dir), None, precision, int8=bool(int8))
        dtype = torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32
        store = AdapterStore(model, adapter_root, max_loaded, compute_dtype=dtype)
        engine = Engine(model, tokenizer, store, autocast=autocast, max_batch=max_batch, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop()
