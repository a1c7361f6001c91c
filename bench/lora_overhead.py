"""LoRA overhead on SmolLM2-135M shapes (random weights), against the base model and PEFT in the same run.

- forward: unmerged LoRA (r=16 on q_proj, v_proj — PEFT's Llama default targets) vs the plain model. Target ≤ 1.02×.
- mixed batch: 16 rows, each routed to its own one of 16 adapters, vs the plain model on the same batch.
  Target ≤ 1.05×. PEFT's `adapter_names` mixed batch on the same adapters is reported alongside.
- train step (forward + cross-entropy + backward + AdamW step): deltatune vs PEFT, same LoRA config and batch.
  Target: no slower than PEFT (ratio ≤ 1.0). Run for q,v r=16 and all-linear r=16.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import deltatune
from bench.common import environment, interleaved, smollm2_shaped, summarise, write

ROWS, TOKENS = 16, 64  # inference batch: one row per adapter in the mixed case
TRAIN_ROWS, TRAIN_TOKENS = 8, 128


def _peft_model(base, targets, names):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    return model


def _forward(base, x, repeats):
    ours = copy.deepcopy(base)
    deltatune.attach(ours, deltatune.config("lora", r=16, alpha=32, targets=["q_proj", "v_proj"], init="random"))
    with torch.no_grad():
        times = interleaved({"base": lambda: base(x), "deltatune_lora_qv_r16": lambda: ours(x)}, repeats)
    return summarise(times, "base")


def _mixed(base, x, repeats):
    names = [f"a{i}" for i in range(ROWS)]
    ours = copy.deepcopy(base)
    for name in names:
        cfg = deltatune.config("lora", r=16, alpha=32, targets=["q_proj", "v_proj"], init="random")
        deltatune.attach(ours, cfg, name=name)
    peft_model = _peft_model(base, ["q_proj", "v_proj"], names).eval()

    def ours_mixed():
        with deltatune.per_sample(ours, names):
            return ours(x)

    with torch.no_grad():
        times = interleaved(
            {"base": lambda: base(x), "deltatune_per_sample_16": ours_mixed,
             "peft_adapter_names_16": lambda: peft_model(x, adapter_names=names)},
            repeats,
        )
    return summarise(times, "base")


def _train_step_fn(model, params, x):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = model(x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _train(base, repeats, targets, label):
    x = torch.randint(0, 49152, (TRAIN_ROWS, TRAIN_TOKENS), generator=torch.Generator().manual_seed(2))
    ours = copy.deepcopy(base).train()
    deltatune.attach(ours, deltatune.config("lora", r=16, alpha=32, targets=targets))
    peft_model = _peft_model(base, targets, ["default"]).train()
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    times = interleaved(
        {f"peft_{label}": _train_step_fn(peft_model, peft_params, x),
         f"deltatune_{label}": _train_step_fn(ours, deltatune.trainable_parameters(ours), x)},
        repeats,
    )
    return summarise(times, f"peft_{label}")


def run(quick: bool = False) -> dict:
    repeats = 3 if quick else 15
    base = smollm2_shaped()
    x = torch.randint(0, 49152, (ROWS, TOKENS), generator=torch.Generator().manual_seed(1))
    results = {
        "forward": _forward(base, x, repeats),
        "mixed_batch": _mixed(base, x, repeats),
        "train_step_qv": _train(base, max(3, repeats // 2), ["q_proj", "v_proj"], "qv_r16"),
        "train_step_all_linear": _train(base, max(3, repeats // 2), "all-linear", "all_linear_r16"),
    }
    targets = {"forward": 1.02, "mixed_batch": 1.05, "train_step_qv": 1.0, "train_step_all_linear": 1.0}
    lines = [
        "# LoRA overhead (SmolLM2-135M shapes, random weights)",
        "",
        f"torch {environment()['torch']}, {environment()['threads']} threads; inference batch {ROWS}×{TOKENS}, "
        f"train batch {TRAIN_ROWS}×{TRAIN_TOKENS}; medians of {repeats} interleaved runs.",
        "",
        "| comparison | variant | median s | ratio to anchor | target |",
        "|---|---|---|---|---|",
    ]
    for section, rows in results.items():
        for variant, r in rows.items():
            anchor = r["ratio"] == 1.0 and variant in ("base",) or variant.startswith("peft_") and "train" in section
            target = "anchor" if anchor else (f"≤ {targets[section]:.2f}" if variant.startswith("deltatune") else "-")
            lines.append(f"| {section} | {variant} | {r['median_s']:.3f} | {r['ratio']:.3f} | {target} |")
    write("lora_overhead", {"environment": environment(), "results": results, "targets": targets},
          "\n".join(lines) + "\n")
    return results
