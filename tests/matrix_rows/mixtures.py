"""Mixture and routing rows (issue 6).

ROWS: the self-contained mixtures (their experts are their own parameters), run by the generic matrix.

LIBRARY_ROWS: X-LoRA and Arrow route over adapters that must be attached first, which the generic matrix cannot do
yet (it would need a per-row `prepare(model, toy)` step run on every model it builds, the fresh model of the
save/load test included). Each entry is (row id, method, fields, the expert adapters to attach first as
(name, method, fields), the toys it runs on); tests/methods/test_library_mixtures.py runs the matrix's properties on
them.
"""

import deltatune.methods.arrow  # noqa: F401  (registers the methods before methods/__init__ lists them)
import deltatune.methods.hydralora  # noqa: F401
import deltatune.methods.moa  # noqa: F401
import deltatune.methods.moe_lora  # noqa: F401
import deltatune.methods.poly  # noqa: F401
import deltatune.methods.xlora  # noqa: F401

ROWS = [
    ("moe_lora", "moe_lora", {"r": 2, "alpha": 4, "num_experts": 3, "top_k": 2}),
    ("moe_lora-dense", "moe_lora", {"r": 2, "num_experts": 2, "top_k": None}),
    ("mola", "mola", {"r": 2, "experts_per_group": [2, 3], "num_layers": 2, "default_experts": 2, "top_k": 2}),
    ("hydralora", "hydralora", {"r": 3, "num_heads": 3}),
    ("poly", "poly", {"r": 2, "n_skills": 3}),
    ("moa", "moa", {"experts": [{"method": "lora", "r": 2}, {"method": "loha", "r": 2}, {"method": "ia3"}],
                    "router_expansion": 2}),
    ("moa-sparse", "moa", {"experts": [{"method": "lora", "r": 3}, {"method": "lora", "r": 1}], "variant": "sparse",
                           "router_expansion": 0, "max_threshold": 0.3}),
]

_LORA_EXPERTS = [("e0", "lora", {"r": 2, "init": "random"}), ("e1", "lora", {"r": 3, "init": "random"}),
                 ("e2", "loha", {"r": 2, "init": "random"})]

LIBRARY_ROWS = [
    ("xlora", "xlora", {"experts": ["e0", "e1", "e2"], "depth": 2, "hidden": 8, "layerwise_scalings": True},
     _LORA_EXPERTS, ("llama", "gpt2")),
    ("xlora-topk", "xlora", {"experts": ["e0", "e1", "e2"], "top_k": 2, "softmax_topk": True, "dropout": 0.0},
     _LORA_EXPERTS, ("llama",)),
    ("arrow", "arrow", {"experts": ["e0", "e1", "e2"], "top_k": 2, "temperature": 0.5},
     _LORA_EXPERTS, ("mlp", "emb", "llama", "gpt2")),
]
