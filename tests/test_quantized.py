"""Weight-only int8 base layers (core.quantized): storage, accuracy against the float layer, adapters on top,
and the refusals (merge into int8, quantise after adapters, nothing to quantise)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import assert_per_sample_matches_alone, make, perturb, run

import deltatune
from deltatune.core.errors import DeltatuneError
from deltatune.core.hosts import read_base_weight
from deltatune.core.quantized import Int8Linear, quantize_int8


def test_int8_linear_stores_one_byte_per_weight_and_rounds_each_entry_to_its_channel_grid():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (24, 64) and q.scales.shape == (24,)
    assert int(q.weight.abs().max()) == 127  # each channel's largest entry maps to the end of the grid
    error = (q.dequantized() - linear.weight.detach()).abs()
    steps = linear.weight.detach().abs().amax(1, keepdim=True) / 127
    assert (error <= steps * (0.5 + 127 * 2 ** -8)).all()  # half a step, plus the bf16 rounding of the scale
    assert (error > 0).any()
    x = torch.randn(3, 5, 64)
    expected = nn.functional.linear(x.bfloat16().float(), q.dequantized().float(), linear.bias.detach())
    out = q(x)
    assert out.shape == (3, 5, 24) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=0.02, rtol=0.02)
    assert (out - run(linear, x)).abs().max() < 0.05


def test_quantize_int8_converts_every_eligible_linear_and_keeps_the_output_close():
    model, x = make("llama")
    reference = run(model, x)
    converted = quantize_int8(model)
    # hidden 16, intermediate 32: every projection and the head qualify (input widths are multiples of 16)
    assert len(converted) == 2 * 7 + 1 and "lm_head" in converted
    assert all(type(model.get_submodule(p)) is Int8Linear for p in converted)
    out = run(model, x)
    cosine = nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.999 and not torch.equal(out, reference)


def test_layers_of_other_widths_stay_in_their_own_precision():
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    assert quantize_int8(model) == ["2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is Int8Linear
    with pytest.raises(DeltatuneError, match="no linear layer"):
        quantize_int8(nn.Sequential(nn.Linear(10, 3)))


def test_adapters_sit_on_int8_layers_with_their_mixed_batch_path():
    model, x = make("llama")
    quantize_int8(model)
    base = run(model, x)
    deltatune.attach(model, deltatune.config("lora", r=4, targets=["q_proj", "v_proj", "down_proj"]), "a")
    deltatune.attach(model, deltatune.config("dora", r=4, targets=["q_proj", "v_proj"]), "b")  # reads W0
    perturb(model, "a", 1)
    perturb(model, "b", 2)
    with deltatune.use(model, "a"):
        assert (run(model, x) - base).abs().max() > 1e-3
    assert_per_sample_matches_alone(model, x, ["a", None, "b", "a"][: x.shape[0]], atol=1e-4, rtol=1e-3)
    host = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert read_base_weight(host).dtype == torch.float32  # deltas read the de-quantised weight


def test_merging_into_int8_and_quantising_after_adapters_are_refused():
    model, _ = make("llama")
    model.model.layers[1].self_attn.q_proj = nn.Linear(16, 16, bias=False)  # stays float: merging it would work
    quantize_int8(model.model.layers[0])
    deltatune.attach(model, deltatune.config("lora", r=4, targets=["q_proj"]), "a")
    perturb(model, "a", 3)
    float_q = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(DeltatuneError, match="cannot merge into Int8Linear.*merge on the full-precision model"):
        deltatune.merge(model, "a")
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, float_q), "nothing is merged on refusal"
    assert model.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.int8
    other, _ = make("llama")
    deltatune.attach(other, deltatune.config("lora", r=4, targets=["q_proj"]), "a")
    with pytest.raises(DeltatuneError, match="quantise the base model first"):
        quantize_int8(other)


def test_generate_int8_from_the_command_line(tmp_path, capsys):
    from train_helpers import make_tiny_llama

    from deltatune.cli import main
    from deltatune.train.interactive import generate_text, load_for_inference, prompt_ids

    tiny = make_tiny_llama(tmp_path / "tiny")
    args = ["generate", "--base", str(tiny), "--prompt", "Hello there", "--greedy", "--max-new-tokens", "6",
            "--precision", "fp32", "--raw"]
    assert main([*args, "--int8"]) == 0
    int8_text = capsys.readouterr().out.strip()
    model, tokenizer, autocast = load_for_inference(str(tiny), None, "fp32", int8=True)
    assert sum(type(m) is Int8Linear for m in model.modules()) == 2 * 7 + 1
    ids = prompt_ids(tokenizer, "Hello there", raw=True)
    assert int8_text == generate_text(model, tokenizer, ids, max_new_tokens=6, greedy=True, autocast=autocast)
    assert int8_text
