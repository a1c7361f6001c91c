"""`deltatune generate` and `deltatune chat`: try a model with or without an adapter, right after training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..core import api
from ..core.errors import DeltatuneError
from ..core.io import CONFIG_NAME, load as load_adapter
from ..core.quantized import quantize_int8
from .evaluate import stop_token_ids
from .loop import resolve_precision
from .models import load_model


def adapter_dir(path: str | Path) -> Path:
    """An adapter directory, or a training output directory holding one under adapter/."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "adapter" / CONFIG_NAME).is_file():
        return path / "adapter"
    raise DeltatuneError(f"{str(path)!r} is neither an adapter directory nor a training output with adapter/")


def load_for_inference(base: str, adapter: str | None = None, precision: str = "auto", int8: bool = False):
    """(model, tokenizer, autocast) for generation; `int8`: base linear weights stored as int8 (core.quantized)."""
    name, autocast = resolve_precision(precision)
    model, tokenizer = load_model(base, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
    if int8:
        quantize_int8(model)  # before the adapter: its own layers stay floats
    if adapter:
        load_adapter(model, adapter_dir(adapter))
    return model, tokenizer, autocast


def prompt_ids(tokenizer, messages: list[dict] | str, raw: bool = False) -> list[int]:
    """Token ids of a prompt: chat messages through the tokenizer's template, or raw text."""
    if raw or getattr(tokenizer, "chat_template", None) is None:
        text = messages if isinstance(messages, str) else messages[-1]["content"]
        return tokenizer(text)["input_ids"]
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_text(model, tokenizer, ids: list[int], *, max_new_tokens: int = 128, greedy: bool = False,
                  temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, autocast=None) -> str:
    from transformers import GenerationConfig

    if max_new_tokens <= 0:
        raise DeltatuneError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    torch.manual_seed(seed)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy,
                              temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                              eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    inputs = torch.tensor([ids])
    with autocast() if autocast else torch.autocast("cpu", enabled=False):
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True).strip()


HELP = "commands: /clear (forget the conversation), /compare (also answer with the base model), /exit"


def chat_loop(model, tokenizer, *, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
              autocast=None, max_new_tokens: int = 256, greedy: bool = False) -> None:
    """A terminal conversation; with an adapter loaded, /compare shows the base model's answer beside it."""
    has_adapter = bool(api.adapters(model))
    history: list[dict] = []
    compare = False
    write(HELP)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            history = []
            write("(conversation cleared)")
            continue
        if line == "/compare":
            compare = has_adapter and not compare
            write(f"(compare {'on' if compare else 'off'}{'' if has_adapter else ': no adapter loaded'})")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = prompt_ids(tokenizer, history)
        answer = generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, greedy=greedy,
                               autocast=autocast)
        write(f"model> {answer}")
        if compare:
            with api.use(model, None):
                write(f"base > {generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, greedy=greedy, autocast=autocast)}")
        history.append({"role": "assistant", "content": answer})
