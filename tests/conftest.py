"""Suite-wide test set-up."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _same_rng_state_for_every_test():
    """Every test starts from the same RNG state, so weights drawn without an explicit seed do not depend on which
    tests ran before it in the same xdist worker (that order changes from run to run)."""
    random.seed(0)
    torch.manual_seed(0)
