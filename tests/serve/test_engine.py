"""The serving engine: greedy tokens independent of batch company, adapter eviction and reload, continuous
batching, stops, seeds, cancellation and KV growth."""

from __future__ import annotations

import pytest
import torch

from deltatune.serve.engine import Request
from deltatune.serve.sampling import SamplingParams
from deltatune.train.interactive import generate_text, load_for_inference, prompt_ids
from deltatune.train.loop import bf16_is_fast

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers.",
           "Explain photosynthesis in one sentence, please, to a child who likes plants."]
NEW_TOKENS = 12
PRECISIONS = ["fp32", "fp32+int8"] + (["bf16"] if bf16_is_fast() else [])  # +int8: `serve --int8` weights


def greedy(engine, prompt: str, adapter: str | None, max_tokens: int = NEW_TOKENS, **params) -> Request:
    ids = prompt_ids(engine.tokenizer, prompt)
    return Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params), adapter=adapter)


def texts(engine, requests) -> list[str]:
    return [event.text for event in engine.run(requests)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_greedy_is_the_same_alone_mixed_reloaded_and_as_generate(make_engine, tiny_dir, adapter_root, precision):
    engine = make_engine(precision, max_loaded=2)
    prompts = PROMPTS[:2] if precision == "bf16" else PROMPTS[:3]  # bf16 autocast is slow on the tiny model
    jobs = [(p, a) for p in prompts for a in (None, "a0", "a1", "ia3")]
    alone = {job: texts(engine, [greedy(engine, *job)])[0] for job in jobs}  # a0, a1, ia3 evict each other
    assert engine.adapters.get("a0").loads >= 2, "max_loaded=2 with three adapters must have evicted and reloaded"
    assert len({alone[(PROMPTS[0], a)] for a in (None, "a0", "a1", "ia3")}) == 4, "adapters must change the output"
    engine.adapters.max_loaded = 8
    mixed = texts(engine, [greedy(engine, *job) for job in jobs])
    assert mixed == [alone[job] for job in jobs]
    for adapter in (None, "a0", "ia3"):
        model, tokenizer, autocast = load_for_inference(str(tiny_dir), adapter and str(adapter_root / adapter),
                                                        precision.partition("+")[0], int8="+int8" in precision)
        for prompt in prompts[:2]:
            reference = generate_text(model, tokenizer, prompt_ids(tokenizer, prompt), max_new_tokens=NEW_TOKENS,
                                      greedy=True, autocast=autocast)
            assert alone[(prompt, adapter)].strip() == reference, (adapter, prompt)


def test_requests_join_and_leave_a_running_batch(make_engine):
    engine = make_engine()
    alone = {p: texts(engine, [greedy(engine, p, "a2", max_tokens=6 + 3 * i)])[0] for i, p in enumerate(PROMPTS)}
    results = {}
    first = greedy(engine, PROMPTS[0], "a2", max_tokens=6)
    first.emit = lambda e, p=PROMPTS[0]: results.setdefault(p, []).append(e)
    engine.submit(first)
    engine.step()
    engine.step()
    for i, prompt in enumerate(PROMPTS[1:], start=1):  # join while the first is mid-generation
        late = greedy(engine, prompt, "a2", max_tokens=6 + 3 * i)
        late.emit = lambda e, p=prompt: results.setdefault(p, []).append(e)
        engine.submit(late)
        engine.step()
    while engine.step():
        pass
    assert {p: "".join(e.text for e in events) for p, events in results.items()} == alone
    assert engine.stats["decode_rows"] > engine.stats["decode_steps"], "rows must have shared decode steps"
    assert engine.running == [] and sorted(engine.free_slots) == list(range(engine.max_batch))


def test_finish_reasons_stop_strings_and_usage(make_engine):
    engine = make_engine()
    full = engine.run([greedy(engine, PROMPTS[1], None)])[0]
    assert full.finish_reason == "length" and len(full.completion_ids) == NEW_TOKENS
    stop = full.text[len(full.text) // 2:][:3]
    cut = engine.run([greedy(engine, PROMPTS[1], None, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert cut.prompt_tokens == len(prompt_ids(engine.tokenizer, PROMPTS[1]))


def test_seeded_sampling_is_reproducible_in_any_batch(make_engine):
    engine = make_engine()

    def sampled(seed):
        ids = prompt_ids(engine.tokenizer, PROMPTS[0])
        return Request(ids, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=seed), adapter="a0")

    alone = texts(engine, [sampled(1)])[0]
    crowd = texts(engine, [greedy(engine, PROMPTS[2], "a1"), sampled(1), sampled(2)])
    assert crowd[1] == alone and crowd[2] != alone


def test_cancel_frees_the_slot_and_the_adapter(make_engine):
    engine = make_engine(max_batch=2)
    events = []
    job = greedy(engine, PROMPTS[0], "a0", max_tokens=50)
    job.emit = events.append
    engine.submit(job)
    engine.step()
    engine.cancel(job.id)
    engine.step()
    assert events[-1].finish_reason == "cancelled"
    assert engine.running == [] and len(engine.free_slots) == 2 and engine.adapters.get("a0").pins == 0


def test_kv_pool_grows_without_changing_tokens(make_engine):
    small = make_engine()
    small.pool.capacity = 4  # far below prompt + completion: grows (doubling) during prefill and decode
    big = make_engine()
    assert texts(small, [greedy(small, PROMPTS[3], "a1", max_tokens=20)]) == \
        texts(big, [greedy(big, PROMPTS[3], "a1", max_tokens=20)])
    assert small.pool.capacity >= len(prompt_ids(small.tokenizer, PROMPTS[3])) + 19  # the last token is never fed


def test_busy_adapters_are_not_evicted(make_engine):
    engine = make_engine(max_loaded=1)
    jobs = [greedy(engine, PROMPTS[0], "a0", max_tokens=8), greedy(engine, PROMPTS[0], "a1", max_tokens=8)]
    events = engine.run(jobs)
    assert [e.finish_reason for e in events] == ["length", "length"]
    loaded = [a["name"] for a in engine.adapters.listing() if a["loaded"]]
    assert loaded == ["a1"], "a1 waits until a0's request finishes, then replaces it"


def test_a_broken_adapter_fails_only_its_request(make_engine, adapter_root, tmp_path):
    engine = make_engine()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    engine.adapters.register("broken", broken)
    bad, good = engine.run([greedy(engine, PROMPTS[0], "broken"), greedy(engine, PROMPTS[0], "a0")])
    assert bad.error and bad.status == 422 and good.finish_reason == "length"
    assert not any(a["loaded"] for a in engine.adapters.listing() if a["name"] == "broken")


def test_a_failing_forward_fails_its_rows_and_the_engine_goes_on(make_engine, monkeypatch):
    engine = make_engine()
    original = engine._forward
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args)

    monkeypatch.setattr(engine, "_forward", flaky)
    failed = engine.run([greedy(engine, PROMPTS[0], "a0")])[0]
    assert failed.error and "boom" in failed.error and failed.status == 500
    assert engine.run([greedy(engine, PROMPTS[0], "a0")])[0].finish_reason == "length"
    assert len(engine.free_slots) == engine.max_batch and engine.adapters.get("a0").pins == 0


def test_engine_thread_serves_and_stops(make_engine):
    engine = make_engine()
    expected = texts(engine, [greedy(engine, PROMPTS[0], "a0")])
    engine.start()
    assert texts(engine, [greedy(engine, PROMPTS[0], "a0")]) == expected
    assert engine.call(lambda: torch.is_grad_enabled() or "ran").result(timeout=30) is not None
    engine.stop()
    assert engine.thread is None
