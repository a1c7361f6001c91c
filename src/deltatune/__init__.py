"""deltatune: parameter-efficient fine-tuning ("delta tuning") for any PyTorch model.

Every method is a plug-in obeying one contract (`deltatune.core.delta.Delta`), so merging, mixed-adapter batches,
save/load in PEFT's format and weighted arithmetic work for every method whose math allows it.

    import deltatune
    cfg = deltatune.config("lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    deltatune.attach(model, cfg)                   # in place; the base stays frozen
    ...train deltatune.trainable_parameters(model)...
    deltatune.save(model, "out/adapter")           # PEFT layout
"""

__version__ = "0.1.0"

from .core.api import (  # noqa: E402
    parallel,
    active,
    adapters,
    attach,
    delete,
    detach,
    merge,
    named_trainable_parameters,
    per_sample,
    set_trainable,
    trainable_parameters,
    unmerge,
    use,
)
from .core.compose import Average, BatchSplit, Fuse, Parallel, Split, Stack  # noqa: E402
from .core.config import DeltaConfig  # noqa: E402
from .core.delta import Delta  # noqa: E402
from .core.errors import DeltatuneError  # noqa: E402
from .core.io import load, load_composition, save, save_composition  # noqa: E402
from .core.registry import config, config_from_dict, get_method, list_methods, register_method  # noqa: E402
from . import optim  # noqa: E402

__all__ = [
    "__version__", "active", "Average", "BatchSplit", "Fuse", "Parallel", "Split", "Stack", "parallel", "adapters", "attach", "config", "config_from_dict", "delete", "detach", "Delta",
    "DeltaConfig", "DeltatuneError", "get_method", "list_methods", "load", "load_composition", "merge", "save_composition", "named_trainable_parameters", "optim",
    "per_sample", "register_method", "save", "set_trainable", "trainable_parameters", "unmerge", "use",
]
