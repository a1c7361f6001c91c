"""Prompt-style rows (prompt tuning, P-tuning, prefix tuning, DePT). They sit on the model body, which the generic
matrix's per-toy target lists do not name (it skips them until `_targets` gives module-only methods their default
placement, a proposed change), so tests/methods/test_prompt_matrix.py runs the same checks on the transformer toys
with the methods' default placement."""

import deltatune.core.io
import deltatune.methods.dept
import deltatune.methods.prefix
import deltatune.methods.prompt
import deltatune.methods.ptuning

ROWS = [
    ("prompt_tuning", "prompt_tuning", {"num_virtual_tokens": 3}),
    ("p_tuning-mlp", "p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
    ("p_tuning-lstm", "p_tuning", {"num_virtual_tokens": 2, "encoder_reparameterization_type": "LSTM",
                                   "encoder_hidden_size": 6}),
    ("prefix_tuning", "prefix_tuning", {"num_virtual_tokens": 3}),
    ("prefix_tuning-projection", "prefix_tuning", {"num_virtual_tokens": 2, "prefix_projection": True,
                                                   "encoder_hidden_size": 8}),
    ("dept", "dept", {"num_virtual_tokens": 2, "r": 3, "max_length": 8}),
]

# PEFT stores a prompt-learning adapter's tensor as a bare `prompt_embeddings` key. deltatune's io writes and reads
# that form once it maps the deltas' `peft_bare_keys` (a proposed core change, io._place_bare_keys); before, it keys
# the tensor under the body's path. Prompt tests compare files in PEFT's form so they hold either way.
IO_PLACES_BARE_KEYS = hasattr(deltatune.core.io, "_place_bare_keys")


def in_peft_form(key: str) -> str:
    """A saved file key as PEFT names it (`base_model.model.<body>.prompt_embeddings` -> `prompt_embeddings`)."""
    return "prompt_embeddings" if key.endswith(".prompt_embeddings") else key
