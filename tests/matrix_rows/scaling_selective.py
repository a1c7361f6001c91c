"""Scaling and selective rows: (IA)³, BitFit, LN-Tuning, trainable tokens, sparse fine-tuning, PaCA."""

import deltatune.methods.bitfit  # noqa: F401
import deltatune.methods.ia3  # noqa: F401
import deltatune.methods.ln_tuning  # noqa: F401
import deltatune.methods.paca  # noqa: F401
import deltatune.methods.sparse_ft  # noqa: F401
import deltatune.methods.trainable_tokens  # noqa: F401

# Every toy module name, so one explicit mask covers every toy (positions fit the smallest weight, 5×5).
_MASK = {name: [0, 3, 7, 12] for name in ("lin0", "lin1", "lin2", "conv2d", "conv1d", "head", "emb", "proj",
                                           "embed_tokens", "q_proj", "v_proj", "down_proj", "c_attn", "c_proj", "c_fc")}

ROWS = [
    # input-side scaling on the FFN-output-like layers of each toy, output side elsewhere
    ("ia3", "ia3", {"feedforward_modules": r"(.*\.)?(lin1|down_proj|mlp\.c_proj|conv1d|proj)"}),
    ("bitfit", "bitfit", {"exclude": ["input_layernorm"]}),  # Llama's RMSNorm has no bias term
    ("ln_tuning", "ln_tuning", {}),
    ("trainable_tokens", "trainable_tokens", {"token_indices": [1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29]}),
    ("sparse_ft", "sparse_ft", {"density": 0.1, "seed": 3}),
    ("sparse_ft-magnitude", "sparse_ft", {"selection": "magnitude", "k": 6}),
    ("sparse_ft-mask", "sparse_ft", {"selection": "mask", "indices": _MASK}),
    ("paca", "paca", {"r": 3, "alpha": 6}),
]
