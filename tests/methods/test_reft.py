"""LoReFT / DiReFT: R stays orthonormal through training, the edit rules, which positions are edited (first / last
real prompt tokens, left or right padding), no edit on decode steps, mixed batches, bad input."""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import assert_generation_per_sample_matches_alone, delta_at, module_host_contract
from toys import make, perturb

import deltatune
import deltatune.methods.reft
from deltatune import Average, BatchSplit, DeltatuneError, Stack
from deltatune.core.slot import slots_of
from deltatune.methods.reft import (
    orthonormal_rows,
    prompt_lengths,
    prompt_lengths_from_labels,
    training_positions,
)

LAYER = "model.layers.0"


def layer_output(model, ids, mask=None, name="default", layer=LAYER):
    """Layer `layer`'s output for a call, under adapter `name` (None: the base model)."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad(), deltatune.use(model, name):
            model(ids, attention_mask=mask)
    finally:
        handle.remove()
    return seen[0]


def test_placement_is_every_transformer_layer():
    model, _ = make("gpt2")
    deltatune.attach(model, deltatune.config("loreft", r=2, layers=[1]))
    assert [p for p, _, _ in slots_of(model)] == ["transformer.h.1"]


def test_rotation_stays_orthonormal_through_training():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("loreft", r=4))
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=1.0)
    for _ in range(3):
        model(x).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    delta = delta_at(model, LAYER)
    rotation = orthonormal_rows(delta.rotation)
    assert not torch.allclose(delta.rotation, orthonormal_rows(torch.randn(4, 16)))
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(delta.state_tensors(None)["rotation"], rotation)


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_edit_rule_at_the_first_and_last_tokens_only(method):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config(method, r=3, first_n=1, last_n=2))
    perturb(model, "default", seed=0)
    base, edited = layer_output(model, x, name=None), layer_output(model, x)
    delta = delta_at(model, LAYER)
    if method == "loreft":
        rotation = orthonormal_rows(delta.rotation)
        expected = base + (base @ delta.weight.t() + delta.bias - base @ rotation.t()) @ rotation
    else:
        expected = base + (base @ delta.weight.t() + delta.bias) @ delta.out
    chosen = [0, 4, 5]
    torch.testing.assert_close(edited[:, chosen], expected[:, chosen])
    torch.testing.assert_close(edited[:, 1:4], base[:, 1:4])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_positions_count_real_tokens_only(padding):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("direft", r=2, first_n=1, last_n=1))
    perturb(model, "default", seed=0)
    mask = torch.ones_like(x)
    pads = slice(0, 2) if padding == "left" else slice(4, 6)
    mask[0, pads] = 0
    changed = (layer_output(model, x, mask) - layer_output(model, x, mask, name=None)).abs().amax(-1) > 1e-6
    expected = torch.zeros_like(changed)
    expected[:, [0, 5]] = True
    expected[0] = False
    expected[0, [2, 5] if padding == "left" else [0, 3]] = True
    assert torch.equal(changed, expected)


def test_generation_edits_the_prompt_once_and_no_decode_step():
    model, _ = make("gpt2")
    deltatune.attach(model, deltatune.config("loreft", r=4, first_n=1, last_n=2))
    perturb(model, "default", seed=0, scale=0.5)
    prompt = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    tokens = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    sequence = prompt
    with torch.no_grad(), prompt_lengths(model, [prompt.shape[1]]):
        for _ in range(4):  # recompute the whole sequence each step, editing only the prompt's positions
            nxt = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, nxt], dim=1)
    assert torch.equal(tokens, sequence)
    with torch.no_grad():
        whole_call = model(sequence[:, :-1]).logits[:, -1]  # without prompt_lengths the whole call is the prompt
        with prompt_lengths(model, [prompt.shape[1]]):
            prompt_only = model(sequence[:, :-1]).logits[:, -1]
    assert (whole_call - prompt_only).abs().max() > 1e-4


def test_training_batches_edit_the_positions_generation_edits():
    """Inside `training_positions`, a prompt + completion batch (right-padded, prompt labelled -100) is edited at
    each row's prompt positions: its prompt logits equal those of the prompt alone, as generation computes them."""
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("loreft", r=2, first_n=1, last_n=1))
    perturb(model, "default", seed=0, scale=0.5)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4], labels[1, :3] = -100, -100  # prompts of 4 and 3 tokens
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    assert prompt_lengths_from_labels(labels, mask).tolist() == [4, 3]
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        with deltatune.get_method("loreft").delta.training_batch(model, batch):
            trained = model(ids, attention_mask=mask).logits
        for row, length in enumerate((4, 3)):
            alone = model(ids[row:row + 1, :length]).logits[0]
            torch.testing.assert_close(trained[row, :length], alone, atol=1e-5, rtol=1e-5)
            assert (whole[row, length - 1] - alone[-1]).abs().max() > 1e-4  # the whole call edits other positions
    packed = {**batch, "attention_mask": torch.ones(2, 1, 7, 7, dtype=torch.bool)}
    with pytest.raises(DeltatuneError, match="packed training batches"), training_positions(model, packed):
        pass


def test_generate_with_per_sample_matches_each_row_alone():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("loreft", r=2), name="a")
    deltatune.attach(model, deltatune.config("direft", r=3, first_n=2, last_n=0), name="b")
    perturb(model, "a", seed=0, scale=0.5)
    perturb(model, "b", seed=1, scale=0.5)
    assert_generation_per_sample_matches_alone(model, x, ["a", "b", None])


@pytest.mark.parametrize("method,toy,targets", [
    ("loreft", "llama", ["model.layers.0", "model.layers.1"]),
    ("direft", "gpt2", ["transformer.h.0", "transformer.h.1"]),
])
def test_layer_hosts_keep_the_contract(method, toy, targets, tmp_path):
    module_host_contract(method, {"r": 2, "first_n": 2, "last_n": 1}, toy, targets, tmp_path)


def test_identity_init_leaves_the_model_unchanged():
    model, x = make("llama")
    base = model(x).logits
    deltatune.attach(model, deltatune.config("loreft", r=3, init="identity"), name="l")
    deltatune.attach(model, deltatune.config("direft", r=3, init="identity"), name="d")
    for name in ("l", "d"):
        with deltatune.use(model, name):
            torch.testing.assert_close(model(x).logits, base, atol=1e-6, rtol=0)


def test_bad_input_is_one_clear_error():
    with pytest.raises(DeltatuneError, match="at least one position"):
        deltatune.config("loreft", first_n=0, last_n=0)
    model, x = make("llama")
    with pytest.raises(DeltatuneError, match="rank 20 exceeds 16"):
        deltatune.attach(model, deltatune.config("loreft", r=20))
    deltatune.attach(model, deltatune.config("loreft", r=2), name="a")
    padded = torch.ones_like(x)
    padded[0, :2] = 0
    with pytest.raises(DeltatuneError, match="BatchSplit"), deltatune.use(model, BatchSplit("a", "a", sizes=[1, 2])):
        model(x, attention_mask=padded)
    with pytest.raises(DeltatuneError, match="prompt_lengths has 2 rows"), prompt_lengths(model, [3, 4]):
        model(x)


def test_inside_compositions():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("loreft", r=2), name="reft")
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["q_proj"]), name="lora")
    perturb(model, "reft", seed=0)
    perturb(model, "lora", seed=1)
    with torch.no_grad():
        with deltatune.use(model, "reft"):
            alone = model(x).logits
        with deltatune.use(model, Average("reft", "lora", weights=[1.0, 0.0])):
            torch.testing.assert_close(model(x).logits, alone)
        with deltatune.use(model, Stack("lora", "reft")):
            stacked = model(x).logits
        with deltatune.use(model, ["lora", "reft"]):
            torch.testing.assert_close(model(x).logits, stacked)


def test_the_trainer_enters_the_training_context_for_reft_only():
    """The trainer wraps each micro-batch in `training_batch` of the delta classes that override it: ReFT here,
    not LoRA (whose batches need nothing)."""
    from deltatune.train.loop import batch_context_classes

    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["q_proj"]), name="lora")
    assert batch_context_classes(model) == []
    deltatune.attach(model, deltatune.config("loreft", r=2), name="reft")
    assert batch_context_classes(model) == [deltatune.get_method("loreft").delta]
