"""X-LoRA: PEFT parity (same classifier weights and experts -> same scalings and logits), the scaling pass, the
per-layer mixture of the experts' updates, generation, training only the classifier, and bad input."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.core.api import shared_of
from deltatune.methods import xlora
from deltatune.methods.mixture import routing
from peft_roundtrip import peft, randomise
from test_library_mixtures import peft_lora_library, router_over
from toys import make, perturb, run


def _experts(tmp_path) -> list[str]:
    return peft_lora_library(tmp_path)


def _ours(paths, **fields):
    return router_over("xlora", paths, "xl", **fields)


@pytest.mark.parametrize("peft_fields,fields", [
    ({"xlora_depth": 1, "layerwise_scalings": True}, {"depth": 1, "layerwise_scalings": True}),
    ({"xlora_depth": 3, "xlora_size": 8, "top_k_lora": 1, "enable_softmax_topk": True, "enable_softmax": False},
     {"depth": 3, "hidden": 8, "top_k": 1, "softmax_topk": True, "softmax": False}),
    ({"xlora_depth": 2, "xlora_size": 8, "softmax_temperature": 0.5, "global_scaling_weight": 2.0},
     {"depth": 2, "hidden": 8, "temperature": 0.5, "global_scaling_weight": 2.0}),
])
def test_same_scalings_and_logits_as_peft_xlora(peft_fields, fields, tmp_path):
    paths = _experts(tmp_path)
    base, x = make("llama")
    base.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=16, adapters={"0": paths[0], "1": paths[1]},
                              **peft_fields)
    theirs = peft.get_peft_model(base, config).eval()
    randomise(theirs, seed=5, only="internal_xlora_classifier")
    expected = run(theirs, x)
    ours, _ = _ours(paths, **fields)
    classifier = {k.split("internal_xlora_classifier.")[1]: v for k, v in theirs.state_dict().items()
                  if "internal_xlora_classifier" in k}
    shared_of(ours, "xl").load_state_dict(classifier)
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xlora.scalings(ours, "xl"), theirs.base_model.get_latest_scalings(), atol=1e-6, rtol=0)


def test_each_layer_adds_its_scaled_expert_updates(tmp_path):
    ours, x = _ours(_experts(tmp_path), layerwise_scalings=True)
    perturb(ours, "xl", seed=0)
    q_proj = ours.model.layers[1].self_attn.q_proj
    seen = {}
    q_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    run(ours, x)
    lam = xlora.scalings(ours, "xl")[:, :, 2]  # q_proj of layer 1 is the third adapted layer
    with torch.no_grad():
        y0 = torch.nn.functional.linear(seen["x"], q_proj.weight)
        expected = y0.clone()
        for e in range(2):
            lora = q_proj.deltatune[f"e{e}"]
            expected += lam[..., e : e + 1] * lora.scaling * seen["x"] @ lora.lora_A.t() @ lora.lora_B.t()
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing(ours, "xl")["model.layers.1.self_attn.q_proj"].weights, lam)


def test_the_scaling_pass_sees_the_experts_at_the_pass_value(tmp_path):
    """With a pass value of 1, the classifier reads the hidden states of the model with every expert fully on."""
    ours, x = _ours(_experts(tmp_path), scaling_pass_value=1.0)
    seen = []
    ours.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(out.last_hidden_state.clone()),
                                     with_kwargs=True)
    run(ours, x)
    with deltatune.use(ours, deltatune.Stack("e0", "e1")), torch.no_grad():
        both = ours.model(x).last_hidden_state
    torch.testing.assert_close(seen[0], both, atol=1e-6, rtol=1e-5)  # the first body call is the scaling pass


def test_generate_needs_the_whole_sequence(tmp_path):
    ours, x = _ours(_experts(tmp_path))
    with pytest.raises(DeltatuneError, match="use_cache=False"):
        ours.generate(x, max_new_tokens=3, do_sample=False)
    out = ours.generate(x, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (3, 9)
    with torch.no_grad():
        logits = ours(out[:, :-1]).logits
    assert torch.equal(logits[:, -1].argmax(-1), out[:, -1])  # greedy step = full forward on the prefix


def test_only_the_classifier_trains_and_experts_stay_untouched(tmp_path):
    ours, x = _ours(_experts(tmp_path))  # load() froze the experts
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".deltatune.xl.shared." in n for n in trainable)
    ours.train()
    ours(x).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if p.requires_grad)


def test_saved_classifier_keys(tmp_path):
    from safetensors.torch import load_file

    ours, _ = _ours(_experts(tmp_path), depth=2, hidden=4)
    deltatune.save(ours, tmp_path / "xl", name="xl")
    keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "xl" / "adapter_model.safetensors").items()}
    assert keys == {"base_model.model.deltatune_shared.layers.0.weight": (4, 16),
                    "base_model.model.deltatune_shared.layers.0.bias": (4,),
                    "base_model.model.deltatune_shared.layers.3.weight": (2, 4),  # 1: ReLU, 2: Dropout (as PEFT)
                    "base_model.model.deltatune_shared.layers.3.bias": (2,)}


def test_bad_input():
    llama, _ = make("llama")
    with pytest.raises(DeltatuneError, match="experts is empty"):
        deltatune.attach(llama, deltatune.config("xlora"))
    with pytest.raises(DeltatuneError, match="top_k=3 exceeds"):
        deltatune.config("xlora", experts=["a", "b"], top_k=3)
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("lora", targets=["lin0"]), name="e0")
    with pytest.raises(DeltatuneError, match="no separate body"):
        deltatune.attach(model, deltatune.config("xlora", experts=["e0"]), name="xl")
    with pytest.raises(DeltatuneError, match="exactly one model body"):
        deltatune.attach(model, deltatune.config("xlora", experts=["e0"], targets=["lin0"]), name="xl")
