"""House rules that keep the plug-in design honest: registration, layering, size."""

from __future__ import annotations

import re
from pathlib import Path

import deltatune

SRC = Path(deltatune.__file__).parent
HELPERS = {"lora_peft", "factored", "prompt_body", "mixture", "lora_init"}  # method-family modules that register nothing themselves


def test_every_method_module_registers_something():
    registered = {s.delta.__module__.rsplit(".", 1)[-1] for s in deltatune.list_methods().values()}
    registered |= {s.config.__module__.rsplit(".", 1)[-1] for s in deltatune.list_methods().values()}
    modules = {p.stem for p in (SRC / "methods").glob("*.py") if p.stem != "__init__"}
    assert modules - HELPERS <= registered, f"modules that register nothing: {sorted(modules - HELPERS - registered)}"
    listed = (SRC / "methods" / "__init__.py").read_text()
    for name in registered:
        assert re.search(rf"\b{name}\b", listed), f"methods/__init__.py must import {name}"


def test_core_never_names_a_method():
    names = set(deltatune.list_methods())
    for path in (SRC / "core").glob("*.py"):
        text = path.read_text()
        for name in names:
            assert not re.search(rf"(['\"]){name}\1", text), f"core/{path.name} mentions method {name!r}"


def test_layers_import_only_downward():
    for path in (SRC / "core").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"from \.\.(methods|train|merge|serve|analysis|cli)\b", text), path.name
    for path in (SRC / "methods").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"from \.\.(train|merge|serve|analysis|cli|optim|demo)\b", text), path.name


def test_file_sizes():
    for path in SRC.rglob("*.py"):
        limit = 400 if path.parent.name == "methods" else 500
        lines = len(path.read_text().splitlines())
        assert lines <= limit, f"{path.relative_to(SRC)} has {lines} lines (limit {limit})"


def test_every_method_cites_its_paper_with_a_link():
    for name, spec in deltatune.list_methods().items():
        link = r"https://(arxiv\.org/abs/\d{4}\.\d{4,5}|openreview\.net/forum\?id=\w+)"
        assert re.search(link, spec.paper), name
        doc = __import__(spec.delta.__module__, fromlist=["_"]).__doc__ or ""
        assert re.search(link, doc), f"{spec.delta.__module__} docstring must cite the paper"


def test_subpackages_do_not_shadow_the_public_api():
    """Importing every subpackage must leave deltatune's public functions in place (a subpackage named like a
    function replaces it as a package attribute)."""
    import importlib
    import pkgutil

    before = {name: getattr(deltatune, name) for name in deltatune.__all__}
    for info in pkgutil.walk_packages(deltatune.__path__, "deltatune."):
        importlib.import_module(info.name)
    for name, value in before.items():
        assert getattr(deltatune, name) is value, f"deltatune.{name} was replaced by importing a subpackage"
