"""Shared fixtures for the analysis tests: toy adapters on the tiny Llama, a fast stand-in embedder, a store."""

from __future__ import annotations

import pytest
from analysis_helpers import HashEmbedder
from toys import perturb

import deltatune


@pytest.fixture
def embedder():
    return HashEmbedder()


@pytest.fixture
def store(tmp_path, embedder):
    from deltatune.analysis.store import AdapterStore

    with AdapterStore(tmp_path / "store", create=True, embedder=embedder) as opened:
        yield opened


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama directory with SmolLM2's tokenizer (what `--base DIR` loads in CLI tests)."""
    from train_helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_dir, tmp_path_factory):
    """Two LoRA adapters (q_proj, v_proj, r=2) on the tiny Llama directory: {name: directory}."""
    from deltatune.train.models import load_model

    out = {}
    for seed, name in enumerate(["json", "poems"]):
        model = load_model(str(tiny_dir))[0]
        deltatune.attach(model, deltatune.config("lora", r=2, targets=["q_proj", "v_proj"]), name=name)
        perturb(model, name, seed, 0.2)
        out[name] = deltatune.save(model, tmp_path_factory.mktemp("adapters") / name, name=name)
    return out
