"""Training speed and memory on the demo task: deltatune's training step vs PEFT + a plain transformers step.

Same model (the embedded SmolLM2-135M-Instruct), same data (the demo task, batch 8, same batch order), same LoRA
(r=16, alpha=32, all-linear). Each variant runs in its own process so that peak RSS is its own. Variants:
- peft_fp32: PEFT's LoRA, the model's own forward with labels (full logits + cross-entropy), float32 — what a PEFT
  user gets by default. The anchor.
- peft_bf16_autocast: the same under bf16 autocast, to show how much of the gap is precision alone.
- deltatune_fp32: deltatune's step in float32 (loss only at completion tokens, chunked LM head, fused LoRA).
- deltatune_default: the default recipe settings (precision auto: bf16 where the CPU has native bf16).
Target: deltatune_default ≥ 1.3× peft_fp32 tokens/s at ≤ 0.7× its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, environment, write
from deltatune.train.report import peak_rss_bytes

VARIANTS = ["peft_fp32", "peft_bf16_autocast", "deltatune_fp32", "deltatune_default"]
BATCH = 8


def _batches(tokenizer, steps: int):
    from deltatune.train.data import BatchStream, detect_format, read_jsonl, render
    from deltatune.train.demo_task import DATA_DIR

    records = read_jsonl(str(DATA_DIR / "train.jsonl"))
    examples, _ = render(records, tokenizer, detect_format(records), max_length=256)
    stream = BatchStream([[e] for e in examples], BATCH, 0, tokenizer.pad_token_id)
    return [stream.next() for _ in range(steps)]


def _peft_step(variant: str, steps: int, warmup: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from deltatune.train.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "peft_bf16_autocast")

    def step(batch):
        with autocast:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, _batches(tokenizer, steps + warmup), warmup)


def _deltatune_step(variant: str, steps: int, warmup: int) -> dict:
    import deltatune
    from deltatune.train.distributed import LossModule
    from deltatune.train.loop import resolve_precision
    from deltatune.train.models import load_model

    precision, autocast = resolve_precision("fp32" if variant == "deltatune_fp32" else "auto")
    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    deltatune.attach(model, deltatune.config("lora", r=16, alpha=32, targets="all-linear"))
    model.train()
    loss_module = LossModule(model, "causal_lm", 512)
    optimizer = torch.optim.AdamW(deltatune.trainable_parameters(model), lr=1e-4)

    def step(batch):
        with autocast():
            total, n, _ = loss_module(batch)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = _timed(step, _batches(tokenizer, steps + warmup), warmup)
    result["precision"] = precision
    return result


def _timed(step, batches: list[dict], warmup: int) -> dict:
    for batch in batches[:warmup]:
        step(batch)
    start, tokens = time.perf_counter(), 0
    for batch in batches[warmup:]:
        step(batch)
        tokens += int(batch["tokens"])
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "seconds_per_step": seconds / (len(batches) - warmup),
            "peak_rss_bytes": peak_rss_bytes(),
            "steps": len(batches) - warmup, "tokens": tokens}


def worker(variant: str, steps: int, warmup: int, out: Path) -> None:
    torch.manual_seed(0)
    run = _peft_step if variant.startswith("peft") else _deltatune_step
    out.write_text(json.dumps(run(variant, steps, warmup)))


def run(quick: bool = False) -> dict:
    steps, warmup = (4, 1) if quick else (20, 3)
    results = {}
    for variant in VARIANTS:
        out = RESULTS / f".train_speed_{variant}.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "bench.train_speed", "--worker", variant, "--steps", str(steps),
                               "--warmup", str(warmup), "--out", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed: {proc.stderr[-2000:]}")
        results[variant] = json.loads(out.read_text())
        out.unlink()
    anchor = results["peft_fp32"]
    for r in results.values():
        r["speed_vs_peft_fp32"] = r["tokens_per_s"] / anchor["tokens_per_s"]
        r["memory_vs_peft_fp32"] = r["peak_rss_bytes"] / anchor["peak_rss_bytes"]
    lines = ["# Training step: deltatune vs PEFT + transformers (demo task, SmolLM2-135M, LoRA r16 all-linear)", "",
             f"torch {environment()['torch']}, {environment()['threads']} threads, batch {BATCH}, {steps} timed steps "
             f"after {warmup} warm-up; each variant in its own process.", "",
             "| variant | tokens/s | s/step | peak RSS (GiB) | speed vs PEFT fp32 | memory vs PEFT fp32 |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['speed_vs_peft_fp32']:.2f}× | "
                     f"{r['memory_vs_peft_fp32']:.2f}× |")
    lines += ["", "Target: deltatune_default ≥ 1.30× speed at ≤ 0.70× memory."]
    write("train_speed", {"environment": environment(), "results": results}, "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=VARIANTS, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    worker(args.worker, args.steps, args.warmup, args.out)
