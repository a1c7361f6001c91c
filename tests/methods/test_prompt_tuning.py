"""Prompt tuning and the machinery every prompt-style method shares: virtual tokens in front of the real ones,
inits, generate with a KV cache, mixed batches across methods, compositions, training, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from toys import make, perturb, run
from train_helpers import demo_rows, make_tiny_llama, write_jsonl, write_recipe

import deltatune
import deltatune.methods.dept
import deltatune.methods.prefix
import deltatune.methods.prompt
import deltatune.methods.ptuning
from deltatune import DeltatuneError


def _delta(model, name="default"):
    return model.base_model.deltatune[name]


def _base_logits(model, **inputs):
    with torch.no_grad(), deltatune.use(model, None):
        return model(**inputs).logits


@pytest.mark.parametrize("toy", ["llama", "gpt2"])
def test_output_is_the_base_model_on_virtual_then_real_tokens(toy):
    model, x = make(toy)
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=4))
    prompt = _delta(model).prompt_encoder.embedding.weight.detach()
    embeds = torch.cat([prompt.expand(x.shape[0], -1, -1), model.get_input_embeddings()(x)], dim=1)
    expected = _base_logits(model, inputs_embeds=embeds)[:, 4:]  # positions 0..P-1 virtual, P.. real
    torch.testing.assert_close(run(model, x), expected, atol=1e-6, rtol=0)


def test_vocab_and_random_inits():
    model, _ = make("llama")
    words = model.get_input_embeddings().weight
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=6), name="v")
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=6, init="random"), name="r")
    vocab = _delta(model, "v").prompt_encoder.embedding.weight
    assert all((words == row).all(-1).any() for row in vocab)  # every virtual token is some word's embedding
    uniform = _delta(model, "r").prompt_encoder.embedding.weight
    assert uniform.abs().max() <= 0.5 and uniform.std() > 0.2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_text_init_uses_the_models_own_tokenizer(tiny, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    text = "Answer in JSON"
    model = LlamaForCausalLM.from_pretrained(tiny)
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=7, init="text", init_text=text))
    ids = AutoTokenizer.from_pretrained(tiny)(text)["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 7)[:7]]  # repeated, then cut to P
    torch.testing.assert_close(_delta(model).prompt_encoder.embedding.weight, expected, atol=0, rtol=0)
    deltatune.save(model, tmp_path / "a")
    fresh = LlamaForCausalLM.from_pretrained(tiny)
    deltatune.load(fresh, tmp_path / "a")
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=0, rtol=0)


def test_text_init_without_a_tokenizer_is_one_clear_error():
    model, _ = make("llama")  # a model built in memory records no directory
    with pytest.raises(DeltatuneError, match="init='text' needs a tokenizer: set tokenizer="):
        deltatune.attach(model, deltatune.config("prompt_tuning", init="text", init_text="hello"))
    assert not hasattr(model, "_deltatune_state")
    with pytest.raises(DeltatuneError, match="cannot load a tokenizer from '/nonexistent'"):
        deltatune.attach(model, deltatune.config("prompt_tuning", init="text", init_text="hi",
                                                 tokenizer="/nonexistent"))


# ---- generate and mixed batches ----------------------------------------------------------------------------------
def _greedy_without_cache(model, ids, mask, steps):
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def _mixed_model(toy):
    model, x = make(toy)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # compare fixed-length continuations
    adapters = {"pt": ("prompt_tuning", {"num_virtual_tokens": 3}), "pre": ("prefix_tuning", {"num_virtual_tokens": 2}),
                "dept": ("dept", {"num_virtual_tokens": 2, "r": 2, "max_length": 8}),
                "pe": ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 8})}
    for seed, (name, (method, fields)) in enumerate(adapters.items()):
        deltatune.attach(model, deltatune.config(method, **fields), name=name)
        perturb(model, name, seed, scale=1.0)
    ids, mask = x.clone(), torch.ones_like(x)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded row
    return model, ids, mask


@pytest.mark.parametrize("toy", ["llama", "gpt2"])
@pytest.mark.parametrize("routing", ["pt", "pre", "dept", ["pt", None, "pre"], ["dept", "pe", "pt"]])
def test_generate_with_cache_equals_recomputing_and_rows_alone(toy, routing):
    model, ids, mask = _mixed_model(toy)
    rows = routing if isinstance(routing, list) else [routing] * ids.shape[0]
    with deltatune.per_sample(model, rows) if isinstance(routing, list) else deltatune.use(model, routing):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(out, _greedy_without_cache(model, ids, mask, 5))
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        with deltatune.use(model, name):
            row = ids[i:i + 1, keep]  # with an explicit mask: generate would mask the toy's token 0 (its pad id)
            alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=5,
                                   do_sample=False)
        assert torch.equal(out[i, -5:], alone[0, -5:])


@pytest.mark.parametrize("rows", [["pt", "pre", "dept"], ["pe", None, "pre"], [None, None, "dept"]])
def test_mixed_batch_across_methods_equals_rows_alone(rows):
    model, ids, mask = _mixed_model("llama")
    with deltatune.per_sample(model, rows), torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        with deltatune.use(model, name), torch.no_grad():
            alone = model(input_ids=ids[i:i + 1, keep]).logits
        torch.testing.assert_close(mixed[i:i + 1, keep], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["pt", "pre", "dept", "pe", ["pt", "pre", "dept"]])
def test_chunked_training_loss_equals_the_loss_on_the_models_logits(routing):
    """deltatune's loss runs the body, then the head at loss positions only: the virtual positions must be gone."""
    from deltatune.train.data import IGNORE
    from deltatune.train.loss import causal_lm_loss

    model, ids, mask = _mixed_model("llama")
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
             "labels": ids.masked_fill(mask == 0, IGNORE)}
    rows = routing if isinstance(routing, list) else [routing] * ids.shape[0]
    with deltatune.per_sample(model, rows) if isinstance(routing, list) else deltatune.use(model, routing):
        total, count = causal_lm_loss(model, batch, chunk=2)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-5)
    total.backward()
    for name in set(rows):
        grads = [p.grad for p in _delta(model, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"{name} got no gradient"


# ---- compositions --------------------------------------------------------------------------------------------------
def test_stack_with_lora_equals_both_active_and_other_blocks_are_refused():
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=3), name="p")
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=2), name="q")
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["q_proj", "v_proj"]), name="l")
    for name, seed in (("p", 0), ("q", 1), ("l", 2)):
        perturb(model, name, seed)
    with deltatune.use(model, ["p", "l"]):
        both = run(model, x)
    with deltatune.use(model, deltatune.Stack("p", "l")):
        torch.testing.assert_close(run(model, x), both, atol=0, rtol=0)
    with deltatune.use(model, deltatune.Stack("p", deltatune.Average("l", weights=[1.0]))):
        torch.testing.assert_close(run(model, x), both, atol=1e-6, rtol=0)  # blocks away from the prompt are fine
    with deltatune.use(model, "l"):
        assert (run(model, x) - both).abs().max() > 1e-3
    for routing, message in ((["p", "q"], "only one prompt-style adapter"),
                             (deltatune.Average("p", "l"), "can only be composed with Stack"),
                             (deltatune.BatchSplit("p", "l", sizes=[1, 2]), "can only be composed with Stack")):
        with deltatune.use(model, routing), pytest.raises(DeltatuneError, match=message):
            run(model, x)


# ---- training --------------------------------------------------------------------------------------------------------
def test_deltatune_train_with_prompt_tuning_lowers_the_loss(tiny, tmp_path):
    from deltatune.cli import main

    write_jsonl(tmp_path / "train.jsonl", demo_rows("train", 8))
    write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval", 2))
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tiny), method="prompt_tuning",
                          delta={"num_virtual_tokens": 8, "init": "text", "init_text": "Reply in JSON."},
                          data={"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 128}, batch_size=2,
                          steps=4, optimizer={"lr": 3e-2}, eval={"max_new_tokens": 1, "before": True},
                          precision="fp32", output_dir=str(tmp_path / "out"))
    assert main(["train", str(recipe)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["after"]["loss"] < results["before"]["loss"]


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,message", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be > 0"),
    ({"init": "text"}, "init_text is needed with init='text'"),
    ({"init_text": "hi"}, "init_text is needed with init='text' and only then"),
    ({"init": "text", "init_text": "  "}, "init_text is empty"),
    ({"init": "words"}, "prompt_tuning.init must be"),
])
def test_bad_config_values(fields, message):
    with pytest.raises(DeltatuneError, match=message):
        deltatune.config("prompt_tuning", **fields)


def test_bad_placement_and_inputs_are_one_clear_error():
    from transformers import LlamaModel

    model, x = make("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltatuneError, match=r"'model.layers.0' \(LlamaDecoderLayer\) is not a transformer body"):
        deltatune.attach(model, deltatune.config("prompt_tuning", targets=r"model\.layers\.0"))
    assert not hasattr(model, "_deltatune_state") and model.state_dict().keys() == state.keys()
    with pytest.raises(DeltatuneError, match="has no separate transformer body"):
        deltatune.attach(LlamaModel(model.config), deltatune.config("prompt_tuning"))
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=2))
    with pytest.raises(DeltatuneError, match="need a 2-D attention mask"):
        model(x, attention_mask=torch.ones(3, 1, 6, 6, dtype=torch.bool))
    out = model(x, use_cache=True)
    with pytest.raises(DeltatuneError, match="must not count its virtual tokens"):
        model(x[:, :1], cache=out.cache, attention_mask=torch.ones(3, 9, dtype=torch.long))


def test_rows_of_different_lengths_are_refused_where_the_body_pools_position_0():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)).eval()
    deltatune.attach(model, deltatune.config("prompt_tuning", num_virtual_tokens=2))
    x = torch.randint(0, 50, (2, 5))
    assert run(model, x).shape == (2, 2)  # one adapter: every row has the same virtual tokens
    with deltatune.per_sample(model, ["default", None]), pytest.raises(DeltatuneError, match="pools position 0"):
        run(model, x)
