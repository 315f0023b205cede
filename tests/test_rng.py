"""exporter.rng: every host RNG captured and restored exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from exporter import rng
from exporter.errors import CheckpointError


def test_rng_capture_restore() -> None:
    import random

    import torch

    gen = np.random.default_rng(5)
    doc, tensors = rng.capture_rng({"data": gen}, torch=True)
    doc = json.loads(json.dumps(doc))

    def draw() -> tuple:
        return (random.random(), np.random.random(), gen.integers(1 << 30), torch.rand(3).tolist())

    first = draw()
    rng.restore_rng(doc, tensors, {"data": gen})
    assert draw() == first
    with pytest.raises(CheckpointError, match="no state for NumPy generator 'other'"):
        rng.restore_rng(doc, tensors, {"other": gen})
