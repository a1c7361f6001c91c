"""The command line: thin, derived from the code, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import deltatune
from deltatune.catalog import markdown_table
from deltatune.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *args], capture_output=True, text=True, timeout=300)


def test_methods_json_lists_every_registered_method(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(deltatune.list_methods())
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["merge"] is True and lora["mixed_batch"] == "gathered" and lora["peft_format"] == "LORA"
    assert lora["params_576x576"] == 8 * (576 + 576)
    assert "embedding" in lora["hosts"] and "arxiv.org/abs/2106.09685" in lora["paper"]


def test_methods_table(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["method", "family", "merge"]
    assert all(name in out for name in deltatune.list_methods())


def test_docs_methods_md_is_generated_from_the_registry():
    from pathlib import Path

    committed = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert committed == markdown_table(), "regenerate with: deltatune methods --markdown > docs/methods.md"


def test_no_command_prints_help_and_fails():
    proc = _cli()
    assert proc.returncode == 2 and "methods" in proc.stdout


@pytest.mark.parametrize("args", [["methods", "--json", "--markdown"], ["nope"]])
def test_argument_errors_exit_nonzero(args):
    proc = _cli(*args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
