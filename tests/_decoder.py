"""Shared pieces of the decoder tests (test_gpt2.py, test_generation.py): a checkpoint that
Hugging Face ``transformers`` writes, and ONNX exports of the gpt2 family built once per run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: A small GPT-2 (the family's default size) and a second, differently sized one.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "n_positions": 128},
    "other": {"n_layer": 3, "n_embd": 48, "n_head": 3, "vocab_size": 777, "n_positions": 64, "n_inner": 80},
}

_CACHE: dict[tuple[str, str], Any] = {}


def transformers() -> Any:
    """``import transformers``, with torchvision made importable first where it is installed.

    transformers imports ``torchvision.transforms`` as soon as torchvision is installed;
    beside torch's CPU wheel PyPI's (CUDA-built) torchvision fails in its package
    ``__init__`` (see ``models/resnet.py``), which would break every transformers model.
    ``torchvision_resnet()`` enters the package without that ``__init__`` first.
    """
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from exporter.models.resnet import torchvision_resnet

        torchvision_resnet()
    import transformers as tf

    return tf


def hf_checkpoint(root: Path, which: str, seed: int = 0) -> Path:
    """``GPT2LMHeadModel(GPT2Config(...)).save_pretrained(dir)`` with seeded random weights."""
    key = (str(root), f"hf-{which}-{seed}")
    if key not in _CACHE:
        import torch

        tf = transformers()
        torch.manual_seed(seed)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**HF_CONFIGS[which])).eval()
        with torch.no_grad():  # LayerNorms and biases away from 1 / 0, so a swap shows
            for name, p in model.named_parameters():
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.add_(0.1 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        d = root / f"hf-gpt2-{which}"
        model.save_pretrained(d)
        _CACHE[key] = d
    return _CACHE[key]


def hf_model(path: Path) -> Any:
    return transformers().GPT2LMHeadModel.from_pretrained(path).eval()


def export(root: Path, framework: str, which: str | None = None) -> tuple[Any, dict[str, np.ndarray], Path]:
    """A gpt2 spec, its state and an ONNX export of it (cached per run).

    ``which=None``: the family's default spec with its seeded state; else the spec and
    weights of :func:`hf_checkpoint` ``which``.  Exported by ``exporter.onnx_export``
    (``torch.onnx.export(dynamo=True)`` / ``jax2onnx``), without a bundle's sweep.
    """
    key = (str(root), f"onnx-{framework}-{which}")
    if key not in _CACHE:
        from exporter import onnx_export, rebuild
        from exporter.models import gpt2
        from exporter.state import load_state

        if which is None:
            spec = gpt2.SPEC
            state = rebuild.init_state(spec, seed=0)
        else:
            ckpt = hf_checkpoint(root, which)
            spec = gpt2.FAMILY.resolve(checkpoint=ckpt).spec
            state, _ = rebuild.prepare_state(spec, load_state(ckpt / "model.safetensors"), strict=True)
        path = root / f"gpt2-{framework}-{which}" / "model.onnx"
        path.parent.mkdir(parents=True)
        built = rebuild.torch_module(spec, state) if framework == "torch" else rebuild.flax_variables(spec, state)
        exported = onnx_export.export_model(spec, framework, built, path)
        assert exported.exporter in ("torch.onnx.dynamo", "jax2onnx"), exported.fallback_reason
        _CACHE[key] = (spec, state, path)
    return _CACHE[key]


def reference(spec: Any, state: dict[str, np.ndarray], framework: str) -> Any:
    """The framework runtime of ``spec`` with ``state``."""
    if framework == "torch":
        from exporter.runtimes.torch import TorchRuntime

        return TorchRuntime(spec, state)
    from exporter.runtimes.jax import JaxRuntime

    return JaxRuntime(spec, state)
