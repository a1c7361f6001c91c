"""`deltatune demo` (what `make demo` runs): LoRA on the embedded SmolLM2-135M-Instruct, end to end, on CPU.

The task (see train/demo_task.py): turn a sentence about a person into a fixed JSON record. The run prints exact
match on 50 held-out sentences before and after training, shows a few generations, and leaves the adapter (PEFT
layout), metrics.jsonl, loss.png, manifest.json and results.json in the output directory.
"""

from __future__ import annotations

from pathlib import Path

from .demo_task import DATA_DIR
from .loop import train
from .recipe import load_recipe

DEMO_RECIPE = DATA_DIR / "demo.yaml"


def _show(title: str, result: dict | None) -> None:
    if not result:
        return
    print(f"\n{title}: exact match {result.get('exact_match', 0):.0%}, eval loss {result.get('loss', float('nan')):.3f}")
    for sample in result.get("samples", []):
        print(f"  expected: {sample['reference']}\n  model:    {sample['answer']}")


def run_demo(out_dir: str | Path = "runs/demo", steps: int | None = None, progress: bool = True) -> dict:
    overrides = [f"output_dir={out_dir}"] + ([f"steps={steps}"] if steps else [])
    recipe = load_recipe(DEMO_RECIPE, overrides)
    print(f"demo: LoRA r={recipe.delta['r']} on {recipe.model}, {recipe.steps} steps of batch {recipe.batch_size}; "
          f"output in {recipe.output_dir}")
    results = train(recipe, progress=progress)
    _show("before training", results.get("before"))
    _show("after training", results.get("after"))
    out = Path(recipe.output_dir)
    print(f"\ntrained in {results['train_seconds']:.0f}s ({results['tokens_per_s']:.0f} tokens/s); "
          f"adapter: {out / 'adapter'}; curves: {out / 'loss.png'}; metrics: {out / 'metrics.jsonl'}")
    return results
