"""TIES merge of three SmolLM2-135M-shaped models (random weights, bf16 safetensors): deltatune vs mergekit.

Both run the same YAML (base + two models, density 0.5, dtype bfloat16), each variant in its own process so peak
RSS is its own (VmHWM read by the process at the end). Wall time is the whole process (start-up and imports
included, what a user waits for) and the merge call alone. Targets: time ≤ 0.5× mergekit's, peak RSS ≤ mergekit's.
The outputs are compared tensor by tensor: deltatune computes half-precision merges in float32 and rounds once
(mergekit computes in bf16), and bf16 magnitudes tie often at the density threshold, so some entries differ by a
rounding step or by a tied pick; the report gives the fraction that differ.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import environment, smollm2_shaped, write

_RUNNER = {
    "deltatune": """
import sys, time
t0 = time.perf_counter()
from deltatune.merging import load_merge_config, run_merge
run_merge(load_merge_config(sys.argv[1]), sys.argv[2])
""",
    "mergekit": """
import sys, time, yaml
t0 = time.perf_counter()
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(config, sys.argv[2], MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
""",
}
_REPORT = """
import json
merge_s = time.perf_counter() - t0
from deltatune.train.report import peak_rss_bytes  # VmHWM: ru_maxrss would include the parent's peak
print(json.dumps({"merge_s": merge_s, "peak_rss_mb": peak_rss_bytes() / 2**20}))
"""


def _make_models(root: Path) -> list[str]:
    """A base and two 'fine-tunes' (base + small noise), saved in bf16 like the real SmolLM2."""
    base = smollm2_shaped(seed=0).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    paths = [str(root / "base")]
    for i in (1, 2):
        tuned = smollm2_shaped(seed=0).to(torch.bfloat16)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.dtype))
        tuned.save_pretrained(root / f"tuned{i}")
        paths.append(str(root / f"tuned{i}"))
        del tuned
    return paths


def _run(variant: str, config: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUNNER[variant] + _REPORT, str(config), str(out)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed: {done.stderr[-2000:]}")
    return {"process_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def _compare(ours: Path, theirs: Path) -> dict:
    from deltatune.merging.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    differing = total = 0
    worst = 0.0
    for name in b.names():
        x, y = a.read(name).float(), b.read(name).float()
        differing += int((x != y).sum())
        total += x.numel()
        worst = max(worst, float((x - y).abs().max()))
    return {"fraction_differing": differing / total, "max_abs_diff": worst, "same_names": set(a.names()) == set(b.names())}


def run(quick: bool) -> dict:
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, one, two = _make_models(root)
        config = root / "ties.yaml"
        config.write_text(yaml.safe_dump({
            "merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "models": [{"model": one, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": two, "parameters": {"weight": 0.5, "density": 0.5}}]}))
        runs: dict[str, list[dict]] = {"mergekit": [], "deltatune": []}
        for i in range(repeats):
            for variant in (["mergekit", "deltatune"] if i % 2 == 0 else ["deltatune", "mergekit"]):
                runs[variant].append(_run(variant, config, root / f"{variant}{i}"))
        agreement = _compare(root / "deltatune0", root / "mergekit0")
    summary = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    anchor = summary["mergekit"]
    for s in summary.values():
        s["time_ratio"] = s["process_s"] / anchor["process_s"]
        s["merge_time_ratio"] = s["merge_s"] / anchor["merge_s"]
        s["rss_ratio"] = s["peak_rss_mb"] / anchor["peak_rss_mb"]
    payload = {"environment": environment(), "repeats": repeats, "results": summary, "runs": runs,
               "agreement": agreement, "targets": {"time_ratio": 0.5, "rss_ratio": 1.0}}
    write("merge", payload, _table(summary, agreement))
    return payload


def _table(summary: dict, agreement: dict) -> str:
    header = "| TIES, 3 × SmolLM2-135M shapes, bf16 | process time | merge call | peak RSS | vs mergekit (time / RSS) |"
    lines = [header, "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['process_s']:.1f} s | {s['merge_s']:.1f} s | {s['peak_rss_mb']:.0f} MB | "
                     f"{s['time_ratio']:.2f}× / {s['rss_ratio']:.2f}× |")
    lines.append("")
    lines.append(f"Outputs: {agreement['fraction_differing']:.2e} of entries differ (max |Δ| "
                 f"{agreement['max_abs_diff']:.3g}: deltatune computes in float32 and rounds once, mergekit in bf16; and "
                 "bf16 magnitudes tie at the density threshold). Targets: time ≤ 0.5×, "
                 "RSS ≤ 1.0×.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
