"""Bottleneck adapters, representation fine-tuning and hypernetwork adapters (activation-space methods)."""

import deltatune.methods.adapterbias
import deltatune.methods.bottleneck
import deltatune.methods.compacter
import deltatune.methods.hyperformer
import deltatune.methods.madx
import deltatune.methods.reft
import deltatune.methods.sparse_adapter  # noqa: F401

ROWS = [
    ("houlsby", "houlsby", {"r": 3}),
    ("pfeiffer", "pfeiffer", {"r": 2, "activation": "gelu"}),
    ("parallel_adapter", "parallel_adapter", {"r": 3}),
    ("scaled_parallel_adapter", "scaled_parallel_adapter", {"reduction_factor": 4}),
    ("adapterbias", "adapterbias", {}),
    ("adapterbias-shared", "adapterbias", {"share_alpha": True, "exclude": ["lin0", "down_proj", "c_proj"]}),
    ("compacter", "compacter", {"r": 4, "n": 2}),
    ("compacter_pp", "compacter_pp", {"r": 3, "n": 3, "activation": "relu"}),
    ("sparse_adapter", "sparse_adapter", {"r": 4, "sparsity": 0.5}),
    ("hyperformer", "hyperformer", {"r": 2, "task_dim": 3, "layer_dim": 2, "projected_dim": 4}),
    ("loreft", "loreft", {"r": 2}),
    ("loreft-identity", "loreft", {"r": 3, "first_n": 2, "last_n": 0, "init": "identity"}),
    ("direft", "direft", {"r": 2, "first_n": 0, "last_n": 2}),
    # a module host (the transformer body): the matrix's toy targets are layers, so it skips; tests/methods/test_madx.py
    ("invertible_adapter", "invertible_adapter", {"init": "random"}),
]
