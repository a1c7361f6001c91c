"""Data-free LoRA inits (PiSSA, MiLoRA, OLoRA, NLoRA, LoftQ): the model is unchanged at step 0, each init's defining
property, PEFT parity where PEFT has the init, and the save format (a plain rank-2r LoRA relative to the original
base, PEFT's `path_initial_model_for_weight_conversion`)."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft_roundtrip import deltatune_saved_loads_in_peft, peft, randomise
from toys import make, perturb, run

import deltatune
from deltatune import DeltatuneError
from deltatune.core.hosts import to_matrix
from deltatune.core.slot import slots_of
from deltatune.methods import lora_init

INITS = ["pissa", "milora", "olora", "nlora", "loftq"]
TARGETS = {"mlp": ["lin0", "lin1", "lin2"], "conv": ["conv2d", "conv1d", "head"], "emb": ["emb", "proj"],
           "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"]}


def _lora(toy: str, init: str, method: str = "lora", targets=None, **fields):
    model, x = make(toy)
    base = run(model, x)
    config = deltatune.config(method, r=2, alpha=4, init=init, targets=targets or TARGETS[toy], **fields)
    deltatune.attach(model, config)
    return model, x, base


def _weights_and_deltas(model):
    return [(to_matrix(s.info, m.weight).float(), s["default"]) for _, m, s in slots_of(model)]


@pytest.mark.parametrize("toy", sorted(TARGETS))
@pytest.mark.parametrize("init", INITS)
def test_output_unchanged_at_step_zero_and_factors_non_zero(init, toy):
    model, x, base = _lora(toy, init)
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)
    for _, delta in _weights_and_deltas(model):
        assert delta.lora_B.abs().max() > 0 and delta.lora_A.abs().max() > 0  # the start is not LoRA's B = 0


def test_dora_takes_the_same_inits():
    model, x, base = _lora("llama", "pissa", method="dora")
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)


def test_pissa_spans_the_principal_and_milora_the_minor_singular_space():
    for init, take in (("pissa", slice(0, 2)), ("milora", slice(-2, None))):
        model, _, _ = _lora("mlp", init)
        for weight, delta in _weights_and_deltas(model):
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            part = u[:, take] @ torch.diag(s[take]) @ vh[take]
            a, b = delta.lora_A, delta.lora_B
            torch.testing.assert_close(delta.scaling * b @ a, part, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b.t() @ b, a @ a.t(), atol=1e-5, rtol=1e-4)  # balanced: both √σ


def test_olora_is_the_qr_of_the_base_weight():
    model, _, _ = _lora("mlp", "olora")
    for weight, delta in _weights_and_deltas(model):
        b, a = delta.lora_B, delta.lora_A
        torch.testing.assert_close(b.t() @ b, torch.eye(2), atol=1e-5, rtol=0)  # orthonormal columns
        torch.testing.assert_close(torch.triu(a[:, :2]), a[:, :2])  # R's first rows: upper triangular
        q, upper = torch.linalg.qr(weight)
        torch.testing.assert_close(b @ a, q[:, :2] @ upper[:2], atol=1e-5, rtol=1e-4)


def test_nlora_recovers_an_exactly_low_rank_matrix_and_is_seeded_per_module():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g)
    a, b = lora_init.nlora(weight, 2, scaling=2.0, seed=3)
    torch.testing.assert_close(2.0 * b @ a, weight, atol=1e-4, rtol=1e-4)
    other, _ = lora_init.nlora(weight, 2, scaling=2.0, seed=4)
    assert not torch.allclose(a, other)
    assert lora_init.path_seed("x.q", 0) == lora_init.path_seed("x.q", 0) != lora_init.path_seed("x.k", 0)


@pytest.mark.parametrize("quantizer", ["nf4", "int4"])
def test_loftq_error_decreases_over_alternations(quantizer):
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    q, left, right, errors = lora_init.loftq_alternation(weight, 4, iters=5, quantizer=quantizer, block_size=16)
    assert all(later <= earlier + 1e-5 for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < errors[0]
    plain = torch.linalg.norm(weight - lora_init.QUANTIZERS[quantizer](weight, 16))
    assert errors[0] < plain  # the low-rank part corrects some of the quantisation error
    torch.testing.assert_close(float(torch.linalg.norm(weight - q - left @ right)), errors[-1], atol=1e-4, rtol=0)


def test_nf4_quantiser_uses_the_nf4_code_per_block():
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    q = lora_init.quantize_nf4(weight, block_size=32)
    levels = torch.tensor(lora_init.NF4_LEVELS)
    for row, original in zip(q, weight):
        codes = row / original.abs().max()
        assert torch.isclose(codes.unsqueeze(1), levels).any(dim=1).all()
        assert len(torch.unique(row)) <= 16
    assert (lora_init.quantize_int4(weight, 32) - weight).abs().max() < (weight.max() - weight.min()) / 15


def test_loftq_factors_are_the_correction_of_the_quantised_weight():
    model, _, _ = _lora("mlp", "loftq", init_options={"iters": 2, "quantizer": "int4", "block_size": 8})
    for weight, delta in _weights_and_deltas(model):
        _, left, right, _ = lora_init.loftq_alternation(weight, 2, 2, "int4", 8)
        torch.testing.assert_close(delta.scaling * delta.lora_B @ delta.lora_A, left @ right, atol=1e-4, rtol=1e-4)


def test_bad_inits_are_refused():
    with pytest.raises(DeltatuneError, match="init_options"):
        deltatune.config("lora", init="pissa", init_options={"bits": 4})
    with pytest.raises(DeltatuneError, match="init must be"):
        deltatune.config("lora", init="pisa")
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="only available for LoRA"):
        deltatune.attach(model, deltatune.config("kasa", r=1, init="pissa", targets=["lin1"]))
    assert not slots_of(model)
    with pytest.raises(DeltatuneError, match="r <= min"):
        deltatune.attach(model, deltatune.config("lora", r=4, init="pissa", targets=["lin2"]))


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_saved_as_plain_rank_2r_lora_that_peft_loads(init, tmp_path):
    config = deltatune.config("lora", r=2, alpha=4, init=init, targets=["q_proj", "v_proj", "embed_tokens"])
    peft_model = deltatune_saved_loads_in_peft(config, "llama", tmp_path)
    saved = peft_model.peft_config["default"]
    assert (saved.r, saved.lora_alpha, saved.init_lora_weights) == (4, 8, True)


def test_rslora_conversion_keeps_the_scaling(tmp_path):
    config = deltatune.config("rslora", r=2, alpha=4, init="pissa", targets=["c_attn"], alpha_pattern={"c_attn": 3.0})
    peft_model = deltatune_saved_loads_in_peft(config, "gpt2", tmp_path)
    assert peft_model.peft_config["default"].r == 4


def test_roundtrip_keeps_trained_and_frozen_parts(tmp_path):
    model, x, _ = _lora("llama", "pissa")
    perturb(model, "default", seed=0)
    deltatune.save(model, tmp_path / "a")
    fresh, _ = make("llama")
    deltatune.load(fresh, tmp_path / "a", trainable=True)
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-5, rtol=1e-5)
    for (_, ours), (_, theirs) in zip(_weights_and_deltas(model), _weights_and_deltas(fresh)):
        torch.testing.assert_close(theirs.offset_A, ours.offset_A)
        torch.testing.assert_close(theirs.lora_B, ours.lora_B)
    assert all(not p.requires_grad for p in fresh.buffers())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_parity_same_factors_and_logits(init):
    model, x = make("llama")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=init,
                                                            target_modules=["q_proj", "v_proj"]))
    randomise(peft_model, seed=0)  # the same trained factors on both sides
    expected = run(peft_model.eval(), x)
    ours, _, _ = _lora("llama", init, targets=["q_proj", "v_proj"])
    ours_slots = {p: s["default"] for p, _, s in slots_of(ours)}
    for name, module in peft_model.named_modules():
        path = name.removeprefix("base_model.model.")
        if path in ours_slots:
            delta = ours_slots[path]
            torch.testing.assert_close(delta.offset_A, _initial(module.lora_A["default"].weight, 0, peft_model),
                                       atol=1e-5, rtol=1e-4)
            delta.lora_A.data.copy_(module.lora_A["default"].weight)
            delta.lora_B.data.copy_(module.lora_B["default"].weight)
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-4)


def _initial(trained, seed, peft_model):
    """PEFT's factor before `randomise` added its noise (the noise is replayed from the same seed)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in peft_model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g) * 0.2
            if p is trained:
                return trained.detach() - noise
    raise AssertionError("parameter not found")


def test_peft_converted_save_loads_with_peft_logits(tmp_path):
    model, x = make("llama")
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for saving the initial adapter
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    randomise(peft_model, seed=1)
    expected = run(peft_model.eval(), x)
    peft_model.save_pretrained(tmp_path / "p", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours, _ = make("llama")
    deltatune.load(ours, tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-4)


def test_unconverted_peft_pissa_adapter_is_refused(tmp_path):
    model, _ = make("llama")
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "p")
    with pytest.raises(DeltatuneError, match="path_initial_model_for_weight_conversion"):
        deltatune.load(make("llama")[0], tmp_path / "p")
