"""The leaderboard: every entry trained the same way in its own process, one JSON per run and a ranked table."""

from __future__ import annotations

import json

import pytest

import deltatune
from deltatune import DeltatuneError
from deltatune.train.leaderboard import leaderboard
from train_helpers import demo_rows, make_tiny_llama, write_jsonl, write_recipe

pytestmark = pytest.mark.xdist_group("train")


def test_leaderboard_ranks_runs_and_records_failures(tmp_path):
    model = make_tiny_llama(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", demo_rows("train", 16))
    write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval", 4))
    recipe = write_recipe(tmp_path / "r.yaml", model=str(model), method="lora",
                          delta={"r": 4, "targets": ["q_proj", "v_proj"]},
                          data={"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 128}, batch_size=4,
                          steps=3, precision="fp32", eval={"before": False, "metrics": ["loss"]},
                          output_dir=str(tmp_path / "unused"))
    rows = leaderboard(recipe, tmp_path / "board", only=["lora", "ia3", "trainable_tokens"],
                       markdown_path=tmp_path / "docs" / "board.md", echo=lambda *_: None)
    by_name = {r["name"]: r for r in rows}
    assert by_name["lora"]["trainable_parameters"] == 2 * 8 * (32 + 32) + 2 * 8 * (32 + 16)  # method defaults: r=8
    assert by_name["ia3"]["eval"]["loss"] > 0 and by_name["ia3"]["adapter_bytes"] > 0
    assert "error" in by_name["trainable_tokens"]  # needs token_indices: recorded, not fatal
    saved = json.loads((tmp_path / "board" / "results" / "lora.json").read_text())
    assert saved["trainable_parameters"] == by_name["lora"]["trainable_parameters"]
    table = (tmp_path / "docs" / "board.md").read_text()
    assert table == (tmp_path / "board" / "leaderboard.md").read_text()
    assert "| lora |" in table and "failed:" in table
    with pytest.raises(DeltatuneError, match="unknown method"):
        leaderboard(recipe, tmp_path / "board2", only=["nope"], echo=lambda *_: None)


def test_all_runs_every_method_and_every_lora_initialisation():
    from deltatune.algorithms.inits import INITS
    from deltatune.methods.lora_init import DATA_FREE
    from deltatune.train.leaderboard import entries

    by_name = {e.name: e for e in entries("all-linear", all_methods=True, only=None)}
    assert set(deltatune.list_methods()) <= set(by_name)
    assert {f"lora init={n}" for n in DATA_FREE} <= set(by_name)
    assert {f"lora initialize={n}" for n in INITS if n != "lora_sb"} <= set(by_name)
    assert "initialize.name=eva" in by_name["lora initialize=eva"].overrides
    default = {e.name for e in entries("all-linear", all_methods=False, only=None)}
    assert "lora init=pissa" in default and not any("initialize=" in n for n in default)
