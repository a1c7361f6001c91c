"""Every registered method's cost, so slow methods are visible: forward overhead against the base model and a
training step against LoRA's, on a 4-layer model with SmolLM2-135M's widths (random weights), q_proj and v_proj
adapted (norm-only methods: the input norms; embedding-only methods: the embedding), default settings.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import deltatune
from bench.common import environment, interleaved, smollm2_shaped, summarise, write

ROWS, TOKENS = 4, 64


def _targets(spec) -> list[str] | None:
    if "linear" in spec.hosts:
        return ["q_proj", "v_proj"]
    if "norm" in spec.hosts:
        return ["input_layernorm"]
    if "embedding" in spec.hosts:
        return ["embed_tokens"]
    return None


def _attach(base, name: str, spec):
    model = copy.deepcopy(base)
    fields = {"targets": _targets(spec)}
    if name == "trainable_tokens":
        fields["token_indices"] = list(range(16))
    deltatune.attach(model, deltatune.config(name, **fields))
    return model


def _train_step(model, x):
    params = deltatune.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = model(x).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(quick: bool = False) -> dict:
    repeats = 2 if quick else 5
    base = smollm2_shaped(layers=4)
    x = torch.randint(0, 49152, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    lora = _attach(base, "lora", deltatune.get_method("lora")).train()
    results = {}
    for name, spec in sorted(deltatune.list_methods().items()):
        if _targets(spec) is None:
            continue
        try:
            model = _attach(base, name, spec)
        except deltatune.DeltatuneError as err:  # a method whose defaults do not fit these shapes
            results[name] = {"family": spec.family, "skipped": str(err)}
            continue
        model.eval()
        with torch.no_grad():
            forward = summarise(interleaved({"base": lambda: base(x), name: lambda: model(x)}, repeats), "base")
        model.train()
        train = summarise(interleaved({"lora": _train_step(lora, x), name: _train_step(model, x)}, repeats), "lora")
        results[name] = {"family": spec.family, "forward_vs_base": forward[name]["ratio"],
                         "train_step_vs_lora": train[name]["ratio"],
                         "trainable": sum(p.numel() for p in deltatune.trainable_parameters(model))}
        del model
    lines = ["# Method costs (4-layer SmolLM2-shaped model, q_proj + v_proj, default settings)", "",
             f"torch {environment()['torch']}, {environment()['threads']} threads, batch {ROWS}×{TOKENS}, medians "
             f"of {repeats} interleaved runs. Forward: unmerged, against the plain model. Train step: forward, "
             "cross-entropy, backward and AdamW, against LoRA r=8 on the same layers.", "",
             "| method | family | trainable params | forward vs base | train step vs LoRA |", "|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["family"], kv[0])):
        if "skipped" in r:
            lines.append(f"| `{name}` | {r['family']} | - | skipped: {r['skipped'][:60]} | - |")
        else:
            lines.append(f"| `{name}` | {r['family']} | {r['trainable']:,} | {r['forward_vs_base']:.2f}× | "
                         f"{r['train_step_vs_lora']:.2f}× |")
    write("methods", {"environment": environment(), "results": results}, "\n".join(lines) + "\n")
    return results
