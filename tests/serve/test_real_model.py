"""The serving guarantee on the embedded SmolLM2-135M, in the precision `serve` picks: greedy tokens of a request are
the same alone, in a mixed batch with other adapters, and as `deltatune generate`. The tiny test model cannot show
this: its matmuls are too small for the kernels' blocking to depend on the batch (a batched prefill broke it on
SmolLM2 in bf16 while every tiny-model test passed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.serve.adapters import AdapterStore
from deltatune.serve.engine import Engine, Request
from deltatune.serve.sampling import SamplingParams
from deltatune.train.demo_task import DATA_DIR
from deltatune.train.interactive import generate_text, load_for_inference, prompt_ids

NEW_TOKENS = 24

# the "train" worker: never beside the multi-process training tests, whose busy cores made this test 10x slower
pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def smollm2_adapters(tmp_path_factory):
    from deltatune.train.models import load_model

    root = tmp_path_factory.mktemp("smollm2-adapters")
    model, _ = load_model("smollm2-135m")
    for i, name in enumerate(("a0", "a1")):
        torch.manual_seed(10 + i)
        deltatune.attach(model, deltatune.config("lora", r=8, alpha=16, targets="all-linear", init="random"), name)
        with torch.no_grad():  # mild: the adapted model still writes text, but other text than the base
            for pname, p in deltatune.named_trainable_parameters(model):
                if f".{name}.lora_B" in pname:
                    p.mul_(0.3)
        deltatune.save(model, root / name, name=name)
        deltatune.delete(model, name)
    return root


def greedy_runs(adapters: Path) -> dict:
    """Greedy tokens of 12 demo prompts over (base, a0, a1): each alone, all in one mixed batch, and `deltatune
    generate`'s text for two of the a0 requests."""
    model, tokenizer, autocast = load_for_inference("smollm2-135m")
    dtype = torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32
    engine = Engine(model, tokenizer, AdapterStore(model, adapters, 4, compute_dtype=dtype), autocast=autocast,
                    max_batch=16)
    prompts = [json.loads(line)["messages"][:1] for line in (DATA_DIR / "train.jsonl").read_text().splitlines()[:12]]
    jobs = [(prompt, (None, "a0", "a1")[i % 3]) for i, prompt in enumerate(prompts)]

    def request(prompt: list[dict], adapter: str | None) -> Request:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
        return Request(prompt_ids(tokenizer, prompt), params, adapter=adapter)

    alone = [engine.run([request(*job)])[0].completion_ids for job in jobs]
    mixed = [event.completion_ids for event in engine.run([request(*job) for job in jobs])]
    reference, ref_tokenizer, ref_autocast = load_for_inference("smollm2-135m", str(adapters / "a0"))
    generated = {i: generate_text(reference, ref_tokenizer, prompt_ids(ref_tokenizer, jobs[i][0]),
                                  max_new_tokens=NEW_TOKENS, greedy=True, autocast=ref_autocast) for i in (1, 4)}
    return {"adapters": [a for _, a in jobs], "alone": alone, "mixed": mixed, "generated": generated,
            "alone_text": {i: tokenizer.decode(alone[i], skip_special_tokens=True).strip() for i in generated}}


def test_smollm2_greedy_is_the_same_alone_mixed_and_as_generate(smollm2_adapters):
    # its own process with passive OpenMP waiting: beside the other pytest worker on 2 cores, spinning OpenMP threads
    # made this run 10x as long (380 s vs 28 s); the wait policy changes no numerics
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, __file__, str(smollm2_adapters)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["mixed"] == runs["alone"]
    base_answers = {tuple(ids) for adapter, ids in zip(runs["adapters"], runs["alone"]) if adapter is None}
    assert len(base_answers) > 1 and any(tuple(ids) not in base_answers for ids in runs["alone"][1::3])
    assert runs["generated"] == runs["alone_text"]


if __name__ == "__main__":
    print(json.dumps(greedy_runs(Path(sys.argv[1]))))
