"""The merge-method decorator: the signature is the schema, checked at registration and at every call."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import Tensor

from deltatune import DeltatuneError
from deltatune.merging import get_merge_method, merge_methods
from deltatune.merging.registry import PerModel, TensorInfo, _build_spec


def _spec(fn, **kw):
    return _build_spec(fn.__name__, fn, "paper", kw.pop("models", (1, None)), kw.pop("defaults", {}),
                       kw.pop("hide", ()))


def test_schema_comes_from_the_signature():
    def method(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float] = 1.0, lambda_: float = 1.0,
               mode: Literal["a", "b"] = "a", info: TensorInfo) -> Tensor:
        return base
    spec = _spec(method)
    assert spec.base == "optional" and spec.info_arg == "info"
    assert list(spec.settings) == ["weight", "lambda", "mode"]  # the trailing underscore is dropped
    assert spec.settings["weight"].per_model and spec.settings["weight"].hint is float
    assert spec.resolve({"weight": 2, "lambda": 3}, 2) == {"weight": [2.0, 2.0], "lambda_": 3.0, "mode": "a"}


def test_missing_annotation_is_refused_at_registration():
    def method(tensors: list[Tensor], *, density=0.5) -> Tensor:
        return tensors[0]
    with pytest.raises(TypeError, match="density.*no annotation"):
        _spec(method)


def test_inputs_must_be_tensors_then_base():
    def method(base: Tensor, tensors: list[Tensor]) -> Tensor:
        return base
    with pytest.raises(TypeError, match="positional parameters"):
        _spec(method)


def test_bad_values_name_the_parameter():
    ties = get_merge_method("ties")
    with pytest.raises(DeltatuneError, match="unknown parameter.*epsilon.*valid: weight, density"):
        ties.resolve({"epsilon": 0.1}, 2)
    with pytest.raises(DeltatuneError, match="density must be float"):
        ties.resolve({"density": "high"}, 2)
    with pytest.raises(DeltatuneError, match="one value per model \\(2\\), got 3"):
        ties.resolve({"weight": [1, 2, 3]}, 2)
    with pytest.raises(DeltatuneError, match="needs parameter 't'"):
        get_merge_method("slerp").resolve({}, 1)
    with pytest.raises(DeltatuneError, match="needs a base model"):
        ties([torch.ones(3)], None)
    with pytest.raises(DeltatuneError, match="exactly 1 model"):
        get_merge_method("slerp")([torch.ones(3), torch.ones(3)], torch.ones(3), t=0.5)


def test_family_is_one_function_with_other_defaults():
    methods = merge_methods()
    family = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
              "della_linear"]
    assert len({methods[n].fn for n in family}) == 1
    assert methods["ties"].settings["normalize"].default is True
    assert methods["task_arithmetic"].settings["normalize"].default is False
    assert "gamma" in methods["breadcrumbs"].settings and "gamma" not in methods["ties"].settings
    assert methods["dare_ties"].randomised and not methods["ties"].randomised
    assert {"epsilon", "seed"} <= set(methods["della"].settings)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(DeltatuneError, match="unknown merge method 'tie'; valid: .*ties"):
        get_merge_method("tie")


def test_the_package_does_not_shadow_deltatune_merge():
    """Importing the merging package must leave the API function `deltatune.merge(model)` in place."""
    from toys import MLP

    import deltatune
    import deltatune.merging
    from deltatune.core.api import merge

    assert deltatune.merge is merge
    model = MLP()
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["lin1"], init="random"))
    x = torch.randn(2, 10)
    expected = model(x)
    deltatune.merge(model)
    assert deltatune.active(model) == ("default",) and "default" in deltatune.core.api._merged(model)
    torch.testing.assert_close(model(x), expected)
