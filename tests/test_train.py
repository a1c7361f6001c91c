"""Training: recipes, data rendering and masks, the chunked loss, the loop, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import deltatune
from deltatune import DeltatuneError
from deltatune.train.data import IGNORE, collate, detect_format, pack, read_jsonl, render
from deltatune.train.loss import causal_lm_loss
from deltatune.train.loop import lr_factor, train
from deltatune.train.recipe import load_recipe, recipe_from_dict
from train_helpers import DEMO, demo_rows, make_tiny_llama, write_jsonl, write_recipe

pytestmark = pytest.mark.xdist_group("train")  # one worker: the tiny model directory is shared


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def _recipe(tmp_path: Path, tiny: Path, **overrides) -> Path:
    write_jsonl(tmp_path / "train.jsonl", demo_rows("train", 24))
    write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval", 4))
    fields = {"model": str(tiny), "method": "lora", "delta": {"r": 4, "alpha": 8, "targets": "all-linear"},
              "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 128}, "batch_size": 4,
              "steps": 8, "optimizer": {"lr": 5e-3}, "eval": {"max_new_tokens": 4, "before": False},
              "precision": "fp32", "output_dir": str(tmp_path / "out")}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            fields[key] = {**fields[key], **value}
        else:
            fields[key] = value
    return write_recipe(tmp_path / "recipe.yaml", **fields)


# ---- recipes --------------------------------------------------------------------------------------------------------
def test_recipe_unknown_keys_list_valid_ones(tmp_path, tiny):
    path = _recipe(tmp_path, tiny)
    with pytest.raises(DeltatuneError, match=r"recipe: unknown key\(s\) stepz; valid keys: model, method"):
        load_recipe(path, ["stepz=3"])
    with pytest.raises(DeltatuneError, match=r"optimizer: unknown key\(s\) lrr; valid keys: name, lr"):
        load_recipe(path, ["optimizer.lrr=3"])
    with pytest.raises(DeltatuneError, match=r"recipe: batch_size must be int, got 'x'"):
        load_recipe(path, ["batch_size=x"])
    with pytest.raises(DeltatuneError, match=r"unknown field\(s\) rank; valid fields"):
        load_recipe(path, ["delta.rank=3"])
    with pytest.raises(DeltatuneError, match="unknown method"):
        load_recipe(path, ["method=nope"])


def test_recipe_overrides_and_paths(tmp_path, tiny):
    recipe = load_recipe(_recipe(tmp_path, tiny), ["optimizer.lr=1e-4", "delta.r=2", "data.packing=true"])
    assert recipe.optimizer.lr == 1e-4 and recipe.delta["r"] == 2 and recipe.data.packing is True
    assert recipe.data.train == str(tmp_path / "train.jsonl")  # relative to the recipe file
    demo = recipe_from_dict({"data": {"train": "demo:train"}, "steps": 1})
    assert demo.data.train == str(DEMO / "train.jsonl")


def test_bad_yaml_names_the_line(tmp_path):
    (tmp_path / "r.yaml").write_text("model: x\nsteps: [1,\n")
    with pytest.raises(DeltatuneError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(tmp_path / "r.yaml")


def test_packaged_demo_recipe_is_the_one_in_recipes():
    root = Path(__file__).parents[1]
    assert (root / "recipes" / "demo.yaml").read_text() == (DEMO / "demo.yaml").read_text()


def test_demo_data_matches_its_generator(tmp_path):
    from deltatune.train.demo_task import write_demo_data

    write_demo_data(tmp_path)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (DEMO / f"{split}.jsonl").read_text()


# ---- data ------------------------------------------------------------------------------------------------------------
def test_data_errors_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', "{oops"])
    with pytest.raises(DeltatuneError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(str(bad))
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DeltatuneError, match=r"m\.jsonl:2: missing field 'completion'"):
        detect_format(read_jsonl(str(missing)))
    empty = write_jsonl(tmp_path / "e.jsonl", ["", " "])
    with pytest.raises(DeltatuneError, match="holds no examples"):
        read_jsonl(str(empty))
    odd = write_jsonl(tmp_path / "o.jsonl", [{"foo": 1}])
    with pytest.raises(DeltatuneError, match="cannot tell the data format"):
        detect_format(read_jsonl(str(odd)))
    with pytest.raises(DeltatuneError, match="does not exist"):
        read_jsonl(str(tmp_path / "none.jsonl"))


def test_chat_loss_covers_exactly_the_assistant_turn(tmp_path, tokenizer):
    rows = read_jsonl(str(write_jsonl(tmp_path / "c.jsonl", demo_rows("train", 2))))
    examples, stats = render(rows, tokenizer, "chat", max_length=512)
    example = examples[0]
    target = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    answer = json.loads((DEMO / "train.jsonl").read_text().splitlines()[0])["messages"][1]["content"]
    assert tokenizer.decode(target).strip() == answer + "<|im_end|>"
    assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")
    assert example.input_ids[: len(example.prompt_ids)] == example.prompt_ids
    assert stats.kept == 2 and stats.loss_tokens > 0


def test_prompt_completion_text_and_truncation(tmp_path, tokenizer):
    rows = read_jsonl(str(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q: two plus two?\nA:", "completion": " four"},
        {"prompt": "word " * 100, "completion": " end"}])))
    examples, stats = render(rows, tokenizer, "prompt_completion", max_length=40)
    assert len(examples) == 1 and stats.truncated == 1
    assert stats.dropped == {"no loss tokens left after truncation": 1}
    labels = examples[0].labels
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == " four<|im_end|>"
    everything, _ = render(rows[:1], tokenizer, "prompt_completion", max_length=40, completion_only=False)
    assert everything[0].labels == everything[0].input_ids
    text_rows = read_jsonl(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there"}])))
    text, _ = render(text_rows, tokenizer, "text", max_length=40)
    assert text[0].labels == text[0].input_ids
    with pytest.raises(DeltatuneError, match="no usable examples"):
        render(rows[1:], tokenizer, "prompt_completion", max_length=40)


def test_classification_labels(tmp_path, tokenizer):
    rows = read_jsonl(str(write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"},
                                                             {"text": "bad", "label": "neg"}])))
    examples, _ = render(rows, tokenizer, "classification", max_length=16, labels=["neg", "pos"])
    assert [e.label for e in examples] == [1, 0]
    with pytest.raises(DeltatuneError, match=r"c\.jsonl:1: label 'pos' is not in the label set \['neg'\]"):
        render(rows, tokenizer, "classification", max_length=16, labels=["neg"])


def test_chunked_loss_equals_full_cross_entropy(tmp_path, tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    rows = read_jsonl(str(write_jsonl(tmp_path / "c.jsonl", demo_rows("train", 3))))
    examples, _ = render(rows, tokenizer, "chat", max_length=512)
    batch = collate([[e] for e in examples], tokenizer.pad_token_id)
    total, n = causal_lm_loss(model, batch, chunk=7)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-4)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_packing_gives_the_same_loss_as_separate_rows(tmp_path, tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    rows = read_jsonl(str(write_jsonl(tmp_path / "c.jsonl", demo_rows("train", 4))))
    examples, _ = render(rows, tokenizer, "chat", max_length=512)
    packed = pack(examples, max_length=512)
    assert len(packed) == 1 and len(packed[0]) == 4
    packed_loss, packed_n = causal_lm_loss(model, collate(packed, tokenizer.pad_token_id))
    alone_loss, alone_n = causal_lm_loss(model, collate([[e] for e in examples], tokenizer.pad_token_id))
    assert packed_n == alone_n
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)


def test_lr_schedule_shapes():
    recipe = recipe_from_dict({"data": {"train": "x"}, "steps": 10, "schedule": {"warmup_steps": 2}})
    factors = [lr_factor(s, 10, recipe) for s in range(10)]
    assert factors[0] < factors[1] < factors[2] == pytest.approx(1.0)
    assert factors[-1] < 0.1 and all(a >= b for a, b in zip(factors[2:], factors[3:]))


# ---- the loop ----------------------------------------------------------------------------------------------------------
def test_train_writes_everything_and_learns(tmp_path, tiny):
    recipe = load_recipe(_recipe(tmp_path, tiny, steps=12, eval={"before": True}))
    results = train(recipe, progress=False)
    out = tmp_path / "out"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.png",
                 "manifest.json", "results.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert results["after"]["loss"] < results["before"]["loss"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["steps"] == 12 and len(manifest["data"]) == 2
    assert all(len(digest) == 64 for digest in manifest["data"].values())


def test_output_dir_and_resume_errors(tmp_path, tiny):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeltatuneError, match="exists and is not a directory"):
        train(load_recipe(_recipe(tmp_path, tiny, output_dir=str(tmp_path / "file"))), progress=False)
    recipe = load_recipe(_recipe(tmp_path, tiny, checkpoint={"every": 4}))
    with pytest.raises(DeltatuneError, match="nothing to resume"):
        train(recipe, resume=True, progress=False)
    train(recipe, progress=False)
    with pytest.raises(DeltatuneError, match="already holds checkpoints of a run; pass --resume"):
        train(recipe, progress=False)


def test_watchdog_stops_on_nan(tmp_path, tiny):
    recipe = load_recipe(_recipe(tmp_path, tiny, optimizer={"lr": 1e30, "grad_clip": None}, steps=6))
    with pytest.raises(DeltatuneError, match="training diverged at step"):
        train(recipe, progress=False)


def test_init_from_continues_from_an_adapter(tmp_path, tiny):
    first = load_recipe(_recipe(tmp_path, tiny, steps=4))
    train(first, progress=False)
    second = load_recipe(_recipe(tmp_path, tiny, steps=1, init_from=str(tmp_path / "out" / "adapter"),
                                 output_dir=str(tmp_path / "second"), optimizer={"lr": 1e-12}))
    train(second, progress=False)
    a = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "second" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "deltatune.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path, tiny):
    """Kill a real training process at a random moment, resume it, and compare with a run never killed."""
    steps = {"steps": 14, "checkpoint": {"every": 2, "keep": 2}, "delta": {"dropout": 0.1},
             "data": {"packing": True}, "grad_accum": 2, "batch_size": 2}
    full = _recipe(tmp_path, tiny, output_dir=str(tmp_path / "full"), **steps)
    proc = _cli("train", str(full), "--quiet")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    killed_recipe = _recipe(tmp_path, tiny, output_dir=str(tmp_path / "killed"), **steps)
    proc = _cli("train", str(killed_recipe), "--quiet")
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoints").is_dir() or not any(
            p.name.startswith("step-") for p in (tmp_path / "killed" / "checkpoints").iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the run ended before writing a checkpoint"
        time.sleep(0.05)
    time.sleep(float(torch.rand(1)) * 1.0)  # somewhere after the first checkpoint, maybe mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli("train", str(killed_recipe), "--resume", "--quiet")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step-000012", "step-000014"]


def test_cli_train_bad_input_is_one_line(tmp_path, tiny):
    bad = write_jsonl(tmp_path / "train.jsonl", ['{"prompt": "a", "completion": "b"}', "{broken"])
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tiny), data={"train": str(bad)}, steps=2,
                          output_dir=str(tmp_path / "o"))
    proc = _cli("train", str(recipe), "--quiet")
    proc.wait(timeout=120)
    err = proc.stderr.read()
    assert proc.returncode == 2 and "train.jsonl:2: malformed JSON" in err and "Traceback" not in err
    proc = _cli("train", str(recipe), "--set", "model=no-such-model", "--quiet")
    proc.wait(timeout=120)
    assert proc.returncode == 2 and "unknown model 'no-such-model'" in proc.stderr.read()


def test_dry_run_and_data_preview(tmp_path, tiny, capsys):
    from deltatune.cli import main

    recipe = _recipe(tmp_path, tiny)
    assert main(["train", str(recipe), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_parameters"] > 0 and report["memory_estimate_bytes"]["total"] > 0
    assert not (tmp_path / "out").exists()
    assert main(["data", str(recipe), "-n", "1"]) == 0
    text = capsys.readouterr().out
    assert "format: chat; 24 records, 24 kept" in text and "⟦{\"name\":" in text and "token lengths:" in text


def test_classification_trains_a_head_on_the_embedded_encoder(tmp_path):
    """minilm-l6 (the embedded BERT) with a new 2-way head: the head is a dense delta on a zero base."""
    rows = [{"text": f"{w} item number {i}", "label": w} for i in range(24) for w in ("red", "blue")]
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", model="minilm-l6", data={"train": "train.jsonl", "eval_split": 0.25},
                          method="lora", delta={"r": 4, "targets": ["query", "value"]}, batch_size=8, steps=20,
                          optimizer={"lr": 5e-3}, precision="fp32", output_dir=str(tmp_path / "out"))
    results = train(load_recipe(recipe), progress=False)
    assert results["before"]["accuracy"] <= 0.75 and results["after"]["accuracy"] == 1.0
    assert (tmp_path / "out" / "head" / "adapter_model.safetensors").is_file()
    from deltatune.train.models import load_model

    model, tokenizer = load_model("minilm-l6", task="classification", num_labels=2)
    deltatune.load(model, tmp_path / "out" / "adapter")
    deltatune.load(model, tmp_path / "out" / "head", name="head")
    deltatune.use(model, ["default", "head"])
    batch = tokenizer(["red item number 99", "blue item number 99"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).tolist() == [1, 0]  # labels sorted: blue=0, red=1


# ---- shipped recipes ---------------------------------------------------------------------------------------------------
RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_renders(path):
    from deltatune.train.loop import prepare

    recipe = load_recipe(path, ["output_dir=/nonexistent/never-written"])
    run = prepare(recipe, attach=False)
    assert run.train_examples and run.eval_examples and run.stats.loss_tokens > 0 or run.task == "classification"
    deltatune.attach(run.model, deltatune.config(recipe.method, **recipe.delta))  # the method fits the model


def test_recipe_data_matches_its_generator(tmp_path):
    import runpy
    import shutil

    source = Path(__file__).parents[1] / "recipes" / "data"
    shutil.copy(source / "make_data.py", tmp_path / "make_data.py")
    runpy.run_path(str(tmp_path / "make_data.py"), run_name="__main__")
    for path in source.glob("*.jsonl"):
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name
