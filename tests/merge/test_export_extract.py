"""export (adapter merged into a transformers directory), LoRA extraction from a full fine-tune, ComPEFT."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import make_tiny_llama

import deltatune
from deltatune import DeltatuneError
from deltatune.cli import main
from deltatune.merging import export, extract_lora
from deltatune.merging.compress import compress, decompress

IDS = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    """A tiny Llama with tied embeddings and SmolLM2's tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "base")


def _adapted(base, targets, tmp_path, method="lora"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    extra = {"lora": {"init": "random", "r": 4}, "dora": {"r": 4}}.get(method, {})
    deltatune.attach(model, deltatune.config(method, targets=targets, **extra))
    with torch.no_grad():
        for p in deltatune.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    deltatune.save(model, tmp_path / "adapter")
    return model


@pytest.mark.parametrize("targets, untied", [(["embed_tokens", "q_proj"], True), (["q_proj", "down_proj"], False)])
def test_export_gives_the_adapted_model(tied_base, tmp_path, targets, untied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _adapted(tied_base, targets, tmp_path)
    report = export(tmp_path / "adapter", str(tied_base), tmp_path / "merged", max_shard_size="1MB")
    assert report["untied_embeddings"] is untied
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings is (not untied)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template


def test_export_refuses_bad_input_without_output(tied_base, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--base", str(tied_base), "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "m").exists()
    _adapted(tied_base, ["q_proj"], tmp_path)
    with pytest.raises(DeltatuneError, match="unknown model"):
        export(tmp_path / "adapter", str(tmp_path / "no_base"), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_extracts_a_lora_from_a_full_fine_tune(tied_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = _adapted(tied_base, ["q_proj", "o_proj", "down_proj"], tmp_path)
    export(tmp_path / "adapter", str(tied_base), tmp_path / "finetuned")
    assert main(["convert", "--finetuned", str(tmp_path / "finetuned"), "--base", str(tied_base),
                 "--out", str(tmp_path / "lora"), "--rank", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 6 and report["rank_max"] == 4 and report["relative_error"] < 1e-5
    fresh = AutoModelForCausalLM.from_pretrained(tied_base).eval()
    deltatune.load(fresh, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-4)
    low = extract_lora(tmp_path / "finetuned", tied_base, out=tmp_path / "lora2", rank=2)
    assert 0.1 < low["relative_error"] < 1 and low["rank_max"] == 2


def test_cli_convert_reports_the_error(tied_base, tmp_path, capsys):
    _adapted(tied_base, ["q_proj", "v_proj"], tmp_path, method="dora")
    assert main(["convert", str(tmp_path / "adapter"), "--base", str(tied_base), "--out", str(tmp_path / "lora"),
                 "--energy", "0.95"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "lora" and report["relative_error"] <= 0.224
    assert main(["convert", str(tmp_path / "adapter"), "--base", str(tied_base), "--out", str(tmp_path / "x")]) == 2
    assert "rank or an energy" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compeft_compresses_and_round_trips(tied_base, tmp_path):
    _adapted(tied_base, ["q_proj", "v_proj", "down_proj"], tmp_path, method="full")
    report = compress(tmp_path / "adapter", tmp_path / "small", density=0.1, base=str(tied_base))
    assert report["ratio"] > 10  # 2 bits + packing per entry instead of 32
    assert 0 < report["quality"]["logit_error_vs_adapter_effect"] < 1.5
    decompress(tmp_path / "small", tmp_path / "back")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_base)
    deltatune.load(model, tmp_path / "back")  # a normal adapter again
    for name, p in model.named_parameters():
        if ".deltatune." in name and p.numel() >= 64:
            assert len(p.detach().unique()) == 3  # ternary: -s, 0, +s (one scale per tensor)
            assert abs((p != 0).float().mean() - 0.1) < 0.02
