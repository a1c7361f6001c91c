"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, scaled parallel): placement from the model structure, the update
rules, BERT's residual-input path, mixed batches, compositions (every layer-hosted method of this group), bad input.

Also holds `module_host_contract`: the generic matrix's checks for methods hosted on blocks / layers / the model body
(which the matrix's leaf-layer targets cannot reach); the other activation-space tests import it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toys import assert_per_sample_matches_alone, make, perturb, run, save_and_reload

import deltatune
import deltatune.methods.adapterbias
import deltatune.methods.bottleneck
import deltatune.methods.compacter
import deltatune.methods.hyperformer
import deltatune.methods.reft
import deltatune.methods.sparse_adapter
from deltatune import Average, BatchSplit, DeltatuneError, Stack
from deltatune.core.slot import Host, is_delta_parameter, slots_of

LLAMA_BLOCKS = ["model.layers.0.mlp", "model.layers.1.self_attn"]
GPT2_BLOCKS = ["transformer.h.0.attn", "transformer.h.1.mlp"]


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def delta_at(model, path: str, name: str = "default"):
    return model.get_submodule(path).deltatune[name]


def module_host_contract(method: str, fields: dict, toy: str, targets: list[str], tmp_path) -> None:
    """The test matrix's contract for a method on module hosts: identity at init (when the config says so), a
    perturbed adapter changes the output, merge refused, disabling gives the base model, save / load round trip,
    the parameter-count formula, only delta parameters train, and a mixed batch equals each row alone."""
    model, x = make(toy)
    base = run(model, x)
    deltatune.attach(model, deltatune.config(method, targets=targets, **fields))
    spec, config = deltatune.get_method(method), deltatune.adapters(model)["default"]
    if spec.delta.identity_for(config):
        torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)
    hosts = {path: slot.info for path, _, slot in slots_of(model)}
    formula = sum(spec.delta.num_parameters(config, info, p) for p, info in hosts.items())
    formula += spec.delta.num_shared_parameters(config, hosts)
    assert sum(p.numel() for p in deltatune.trainable_parameters(model)) == formula
    perturb(model, "default", seed=0)
    adapted = run(model, x)
    assert (adapted - base).abs().max() > 1e-3
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        deltatune.merge(model)
    with deltatune.use(model, None):
        torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)
    save_and_reload(model, toy, tmp_path, atol=1e-5, rtol=1e-5)
    _one_step_changes_only_deltas(model, x)
    deltatune.attach(model, deltatune.config(method, targets=targets, **fields), name="b")
    perturb(model, "b", seed=1)
    assert_per_sample_matches_alone(model, x, ["default", None, "b"])


def _one_step_changes_only_deltas(model, x) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    run_out = model(x)
    (run_out.logits if hasattr(run_out, "logits") else run_out).pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(is_delta_parameter(n) for n in changed)


# ---- placement -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,toy,expected", [
    ("houlsby", "llama", ["model.layers.{i}.mlp.down_proj", "model.layers.{i}.self_attn.o_proj"]),
    ("pfeiffer", "llama", ["model.layers.{i}.mlp.down_proj"]),
    ("parallel_adapter", "llama", ["model.layers.{i}.mlp"]),
    ("houlsby", "gpt2", ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"]),
    ("scaled_parallel_adapter", "gpt2", ["transformer.h.{i}.mlp"]),
])
def test_placement_is_found_from_the_model_structure(method, toy, expected):
    model, _ = make(toy)
    deltatune.attach(model, deltatune.config(method, r=2))
    assert sorted(p for p, _, _ in slots_of(model)) == sorted(e.format(i=i) for i in range(2) for e in expected)


def test_bert_placement_and_parallel_attention_blocks():
    model = tiny_bert()
    deltatune.attach(model, deltatune.config("houlsby", r=2), name="seq")
    deltatune.attach(model, deltatune.config("parallel_adapter", r=2, placement="both"), name="par")
    paths = {name: sorted(p for p, _, s in slots_of(model) if name in s) for name in ("seq", "par")}
    layer = "encoder.layer.{}."
    sequential = ("attention.output.dense", "output.dense")
    assert paths["seq"] == sorted(layer.format(i) + s for i in range(2) for s in sequential)
    assert paths["par"] == sorted(layer.format(i) + s for i in range(2) for s in ("attention.output", "output"))


def test_unknown_architecture_is_a_clear_error_and_targets_by_hand_work():
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="cannot find the attention / feed-forward outputs of MLP.*targets"):
        deltatune.attach(model, deltatune.config("pfeiffer", r=2))
    deltatune.attach(model, deltatune.config("pfeiffer", r=2, targets=["lin1"]))
    assert [p for p, _, _ in slots_of(model)] == ["lin1"]


def test_layers_filter_applies_to_the_found_placement():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("houlsby", r=2, layers=[1]))
    expected = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    assert sorted(p for p, _, _ in slots_of(model)) == expected


# ---- the update rules ------------------------------------------------------------------------------------------------
def _adapter_of(delta, h):
    down, down_bias, up, up_bias = delta.projections()
    return delta.scaling * (delta.act(h @ down.t() + down_bias) @ up.t() + up_bias)


def test_sequential_adapter_adds_f_of_the_layer_output():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("pfeiffer", r=3, targets=["lin1"]))
    perturb(model, "default", seed=0)
    h = torch.relu(model.lin0(x))
    h = model.norm(h)
    with deltatune.use(model, None):
        y = model.lin1(h)
    torch.testing.assert_close(model.lin1(h), y + _adapter_of(delta_at(model, "lin1"), y))


def test_parallel_adapter_reads_the_block_input_and_scaled_one_is_four_times_it():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("parallel_adapter", r=3, targets=["model.layers.0.mlp"]), name="p")
    deltatune.attach(model, deltatune.config("scaled_parallel_adapter", r=3, targets=["model.layers.0.mlp"]), name="s")
    perturb(model, "p", seed=0)
    block = model.get_submodule("model.layers.0.mlp")
    with torch.no_grad():
        block.deltatune["s"].load_state_dict(block.deltatune["p"].state_dict())
        x = torch.randn(2, 5, 16)
        with deltatune.use(model, None):
            y = block(x)
        with deltatune.use(model, "p"):
            parallel = block(x)
        with deltatune.use(model, "s"):
            scaled = block(x)
    torch.testing.assert_close(parallel, y + _adapter_of(block.deltatune["p"], x))
    torch.testing.assert_close(scaled - y, 4 * (parallel - y))


def test_bert_parallel_adapter_adds_to_the_residual_before_the_layer_norm():
    model = tiny_bert()
    deltatune.attach(model, deltatune.config("parallel_adapter", r=3))
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        base = model(ids).last_hidden_state
        torch.testing.assert_close(model(ids).last_hidden_state, base)  # identity at init
    perturb(model, "default", seed=0)
    out_module = model.get_submodule("encoder.layer.0.output")
    inter, residual = torch.randn(2, 6, 24), torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = out_module.LayerNorm(out_module.dense(inter) + residual
                                        + _adapter_of(out_module.deltatune["default"], residual))
        torch.testing.assert_close(out_module(inter, residual), expected)
        with deltatune.per_sample(model, ["default", None]):
            mixed = model(ids).last_hidden_state
        torch.testing.assert_close(mixed[1:], base[1:])
        torch.testing.assert_close(mixed[:1], model(ids[:1]).last_hidden_state)


def test_houlsby_init_is_near_identity_and_identity_init_is_exact():
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("houlsby", r=4), name="h")
    delta = delta_at(model, "model.layers.0.mlp.down_proj", "h")
    assert 0 < delta.up.abs().max() <= 2e-2 and delta.down.abs().max() <= 2e-2
    assert (run(model, x) - base).abs().max() < 1e-2
    deltatune.attach(model, deltatune.config("houlsby", r=4, init="identity"), name="i")
    torch.testing.assert_close(run(model, x), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,toy,targets", [
    ("parallel_adapter", "llama", LLAMA_BLOCKS),
    ("scaled_parallel_adapter", "gpt2", GPT2_BLOCKS),
    ("houlsby", "gpt2", GPT2_BLOCKS),
    ("pfeiffer", "llama", ["model.layers.0", "model.layers.1"]),
])
def test_module_hosts_keep_the_contract(method, toy, targets, tmp_path):
    module_host_contract(method, {"r": 3}, toy, targets, tmp_path)


# ---- mixed batches, generation and compositions ----------------------------------------------------------------------
def test_mixed_activations_on_one_host_fall_back_to_the_grouped_path():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("pfeiffer", r=2, activation="swish"), name="h")
    deltatune.attach(model, deltatune.config("pfeiffer", r=3), name="p")  # relu
    perturb(model, "h", seed=0)
    perturb(model, "p", seed=1)
    assert_per_sample_matches_alone(model, x, ["h", "p", None])


def test_generate_with_per_sample_parallel_adapters_matches_each_row_alone():
    model, x = make("llama")
    for i, name in enumerate(("a", "b")):
        deltatune.attach(model, deltatune.config("parallel_adapter", r=4, placement="both"), name=name)
        perturb(model, name, seed=i, scale=0.5)
    assert_generation_per_sample_matches_alone(model, x, ["a", "b", None])


def assert_generation_per_sample_matches_alone(model, x, names: list, new_tokens: int = 3) -> None:
    """Greedy generation (KV cache) of a batch routed row by row equals each row generated with its adapter alone."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    with deltatune.per_sample(model, names):
        mixed = model.generate(x, **kwargs)
    for i, name in enumerate(names):
        with deltatune.use(model, name):
            assert torch.equal(mixed[i], model.generate(x[i:i + 1], **kwargs)[0])


def test_stack_with_lora_and_one_hot_average():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("pfeiffer", r=3, targets=["lin1"]), name="ad")
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["lin1"]), name="lo")
    perturb(model, "ad", seed=0)
    perturb(model, "lo", seed=1)
    h = model.norm(torch.relu(model.lin0(x)))
    with torch.no_grad():
        with deltatune.use(model, "lo"):
            lora_y = model.lin1(h)
        with deltatune.use(model, Stack("lo", "ad")):
            stacked = model.lin1(h)
        with deltatune.use(model, "ad"):
            alone = run(model, x)
        with deltatune.use(model, Average("ad", "lo", weights=[1.0, 0.0])):
            averaged = run(model, x)
    torch.testing.assert_close(stacked, lora_y + _adapter_of(delta_at(model, "lin1", "ad"), lora_y))
    torch.testing.assert_close(averaged, alone)


LAYER_METHODS = [("houlsby", {"r": 3}), ("pfeiffer", {"r": 2}), ("parallel_adapter", {"r": 3}),
                 ("scaled_parallel_adapter", {"r": 2}), ("adapterbias", {}), ("compacter", {"r": 4, "n": 2}),
                 ("compacter_pp", {"r": 3, "n": 3}), ("sparse_adapter", {"r": 4}),
                 ("hyperformer", {"r": 2, "task_dim": 3, "layer_dim": 2, "projected_dim": 4}),
                 ("loreft", {"r": 2}), ("direft", {"r": 2})]


@pytest.mark.parametrize("method,fields", LAYER_METHODS, ids=[m for m, _ in LAYER_METHODS])
def test_every_method_composes_with_lora_on_one_layer(method, fields):
    """Stack(lora, adapter) feeds LoRA's output to the adapter; Average is the weighted sum of the updates (one-hot:
    that adapter alone); BatchSplit gives each row its adapter's output."""
    model, _ = make("llama")
    path = "model.layers.0.mlp.down_proj"
    deltatune.attach(model, deltatune.config(method, targets=[path], **fields), name="ad")
    deltatune.attach(model, deltatune.config("lora", r=2, targets=[path]), name="lo")
    perturb(model, "ad", seed=0)
    perturb(model, "lo", seed=1)
    layer = model.get_submodule(path)
    h = torch.randn(2, 5, layer.in_features)
    outputs = {}
    with torch.no_grad():
        for key, routing in [("base", None), ("lo", "lo"), ("ad", "ad"), ("stack", Stack("lo", "ad")),
                             ("one_hot", Average("ad", "lo", weights=[1.0, 0.0])),
                             ("average", Average("ad", "lo", weights=[0.5, 0.5])),
                             ("rows", BatchSplit("ad", "lo", sizes=[1, 1]))]:
            with deltatune.use(model, routing):
                outputs[key] = layer(h)
        # the adapter applied to LoRA's output (a copy: a delta may add into a y nobody else reads)
        expected_stack = layer.deltatune["ad"].forward(h, outputs["lo"].clone(), Host(layer, layer.deltatune, None))
    base, lora_y, adapter_y = outputs["base"], outputs["lo"], outputs["ad"]
    assert (adapter_y - base).abs().max() > 1e-3
    torch.testing.assert_close(outputs["stack"], expected_stack)
    torch.testing.assert_close(outputs["one_hot"], adapter_y)
    torch.testing.assert_close(outputs["average"], base + 0.5 * (adapter_y - base) + 0.5 * (lora_y - base))
    torch.testing.assert_close(outputs["rows"], torch.cat([adapter_y[:1], lora_y[1:]]))


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,match", [
    ({"r": 0}, "r must be > 0"),
    ({"reduction_factor": 0}, "reduction_factor must be > 0"),
    ({"activation": "sigmoid"}, "activation must be"),
    ({"placement": "middle"}, "placement must be"),
])
def test_bad_config_is_one_clear_error(fields, match):
    with pytest.raises(DeltatuneError, match=match):
        deltatune.config("houlsby", **fields)


def test_a_block_of_another_width_is_refused_at_run_time():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("pfeiffer", r=2, targets=["model.layers.0.mlp.up_proj"]))
    perturb(model, "default", seed=0)
    run(model, x)  # a sequential adapter reads the layer's own output: any width works
    with pytest.raises(DeltatuneError, match="reads width"):
        delta_at(model, "model.layers.0.mlp.up_proj").adapter_output(torch.randn(2, 5))


def test_gathered_kernel_matches_the_definition():
    model, _ = make("llama")
    for i, name in enumerate(("a", "b")):
        deltatune.attach(model, deltatune.config("pfeiffer", r=2 + i, targets=["o_proj"]), name=name)
        perturb(model, name, seed=i)
    deltas = [delta_at(model, "model.layers.0.self_attn.o_proj", n) for n in ("a", "b")]
    h = torch.randn(3, 4, 16)
    slots = torch.tensor([1, -1, 0])
    out = deltatune.methods.bottleneck.gathered_adapter_output(deltas, slots, h)
    expected = torch.stack([_adapter_of(deltas[1], h[0]), torch.zeros(4, 16), _adapter_of(deltas[0], h[2])])
    torch.testing.assert_close(out, expected)
    assert F.relu is deltas[0].act
