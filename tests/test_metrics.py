"""Task-level metrics (exporter.metrics) on crafted arrays: cosine rows, top-k agreement,
thresholds and their precedence, output kinds, and the report's JSON."""

from __future__ import annotations

import json
import numpy as np
import pytest

from exporter import metrics
from exporter.errors import UsageError
from exporter.models.registry import ModelSpec, TensorSpec, get


# --------------------------------------------------------------------------- cosine
def test_cosine_identical_opposite_orthogonal() -> None:
    r = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    c = np.array([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]], dtype=np.float32)
    np.testing.assert_allclose(metrics.cosine_rows(r, c), [1.0, 0.0, -1.0], atol=1e-12)


def test_cosine_rows_are_the_last_axis_over_every_leading_index() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=(2, 3, 5))
    c = r.copy()
    c[1, 2] = -c[1, 2]
    cos = metrics.cosine_rows(r, c)
    assert cos.shape == (6,)
    np.testing.assert_allclose(cos, [1, 1, 1, 1, 1, -1], atol=1e-12)


def test_cosine_zero_rows_padding_and_nonfinite() -> None:
    r = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    c = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [np.nan, 1.0]])
    cos = metrics.cosine_rows(r, c)
    assert cos[0] == 1.0  # padded position: zero in both
    assert cos[1] == 0.0 and cos[2] == 0.0  # zero in only one
    assert np.isnan(cos[3])  # NaN fails every threshold


def test_cosine_shape_mismatch_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="shapes differ"):
        metrics.cosine_rows(np.zeros((2, 3)), np.zeros((3, 2)))


# --------------------------------------------------------------------------- top-k
def test_top1_agreement_counts_argmax_matches() -> None:
    r = np.array([[0.0, 1.0, 2.0], [5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0]])
    c = r.copy()
    c[2] = [4.0, 3.0, 1.0]  # argmax flips from 1 to 0
    assert metrics.topk_agreement(r, c, 1) == pytest.approx(0.75)


def test_top5_is_the_mean_set_overlap() -> None:
    r = np.arange(10, dtype=np.float64)[None, :].repeat(2, axis=0)  # top5: 9..5
    c = r.copy()
    c[1, 4] = 100.0  # top5 of row 1 becomes {4, 9, 8, 7, 6}: 4 of 5 shared
    assert metrics.topk_agreement(r, c, 5) == pytest.approx((1.0 + 0.8) / 2)


def test_topk_caps_k_and_counts_nonfinite_rows_as_disagreeing() -> None:
    r = np.array([[1.0, 2.0], [2.0, 1.0]])
    c = np.array([[1.0, 2.0], [np.inf, 1.0]])
    assert metrics.topk_agreement(r, c, 5) == pytest.approx(0.5)  # k capped at 2 classes
    with pytest.raises(UsageError, match="k >= 1"):
        metrics.topk_agreement(r, c, 0)


# --------------------------------------------------------------------------- evaluate
def _report(candidates, references, kinds, thresholds):
    return metrics.evaluate(references, candidates, kinds, thresholds, variant="int8")


def test_evaluate_pools_rows_over_cases_and_names_the_failing_metric() -> None:
    rng = np.random.default_rng(1)
    refs = [{"e": rng.normal(size=(3, 8))}, {"e": rng.normal(size=(5, 8))}]
    cands = [{"e": r["e"].copy()} for r in refs]
    cands[1]["e"][4] = rng.normal(size=8)  # one bad row in the second case
    rep = _report(cands, refs, {"e": "embedding"}, {"e": {"cosine_min": 0.99, "cosine_mean": 0.5}})
    assert not rep.ok
    cmin = rep.get("e", "cosine_min")
    assert cmin.rows == 8 and not cmin.ok and cmin.value < 0.99
    assert rep.get("e", "cosine_mean").ok
    (line,) = rep.failures()
    assert "e cosine_min" in line and "< 0.99" in line


def test_evaluate_logits_and_exact_outputs() -> None:
    refs = [{"y": np.eye(4), "ids": np.arange(4)}]
    cands = [{"y": np.eye(4) * 0.9, "ids": np.arange(4)}]
    kinds = {"y": "logits", "ids": "exact"}
    rep = _report(cands, refs, kinds, {"y": {"top1": 0.99, "top5": 0.99}, "ids": {}})
    assert rep.ok and [m.name for m in rep.metrics] == ["top1", "top5"]


def test_evaluate_missing_or_misshapen_output_fails() -> None:
    refs = [{"e": np.ones((2, 3))}]
    rep = _report([{"other": np.ones((2, 3))}], refs, {"e": "embedding"}, {"e": {"cosine_min": 0.5}})
    assert not rep.ok and rep.metrics[0].to_dict()["value"] is None
    rep = _report([{"e": np.ones((3, 2))}], refs, {"e": "embedding"}, {"e": {"cosine_min": 0.5}})
    assert not rep.ok


def test_report_json_has_no_nan_and_shortfall_ranks() -> None:
    refs = [{"e": np.ones((2, 3))}]
    bad = _report([{"e": np.full((2, 3), np.nan)}], refs, {"e": "embedding"}, {"e": {"cosine_min": 0.99}})
    near = _report([{"e": np.array([[1, 1, 0.9], [1, 1, 1]])}], refs, {"e": "embedding"}, {"e": {"cosine_min": 0.9999}})
    d = json.loads(json.dumps(bad.to_dict(), allow_nan=False))
    assert d["ok"] is False and d["metrics"][0]["metric"] == "cosine_min" and d["failures"]
    assert bad.shortfall() > near.shortfall() > 0
    assert "cosine_min" in near.table()


# --------------------------------------------------------------------------- kinds / thresholds
def _spec(**kw) -> ModelSpec:
    return ModelSpec(name="crafted", summary="", inputs=(TensorSpec("x", ("batch", 4)),), outputs=("emb", "logits", "ids"), layout=(), **kw)


def test_builtin_kinds() -> None:
    assert metrics.output_kinds(get("minilm")) == {"sentence_embedding": "embedding", "last_hidden_state": "hidden"}
    assert metrics.output_kinds(get("mlp")) == {"y": "logits"}
    assert metrics.output_kinds(get("cnn")) == {"y": "logits"}


def test_declared_kinds_win_and_undeclared_default_by_dtype() -> None:
    spec = _spec(output_kinds={"emb": "embedding"})
    kinds = metrics.output_kinds(spec, {"emb": "float32", "logits": "float32", "ids": "int64"})
    assert kinds == {"emb": "embedding", "logits": "hidden", "ids": "exact"}


def test_bad_variant_fields_are_refused_when_the_spec_is_made() -> None:
    with pytest.raises(UsageError, match=r"output_kinds\['emb'\] is 'vector'"):
        _spec(output_kinds={"emb": "vector"})
    with pytest.raises(UsageError, match="names output 'nope', which the model does not have"):
        _spec(output_kinds={"nope": "embedding"})
    with pytest.raises(UsageError, match="does not apply to kind 'embedding'"):
        _spec(output_kinds={"emb": "embedding"}, variant_thresholds={"int8": {"emb": {"top1": 0.9}}})
    with pytest.raises(UsageError, match="names variant 'int4'"):
        _spec(variant_thresholds={"int4": {}})
    with pytest.raises(UsageError, match=r"must be a number in \[0, 1\]"):
        _spec(variant_thresholds={"int8": {"logits": {"top1": 2}}})
    with pytest.raises(UsageError, match="must be a Tolerance"):
        _spec(variant_tolerances={"fp16": {"emb": (1e-2, 1e-2)}})


def test_threshold_defaults_fp16_stricter_than_int8() -> None:
    d = metrics.DEFAULT_THRESHOLDS
    assert d["int8"]["embedding"]["cosine_min"] == 0.99 and d["int8"]["logits"]["top1"] == 0.99
    for kind, values in d["int8"].items():
        for m, v in values.items():
            assert d["fp16"][kind][m] >= v, (kind, m)


def test_threshold_precedence_default_spec_then_overrides() -> None:
    spec = _spec(
        output_kinds={"emb": "embedding", "logits": "logits", "ids": "exact"},
        variant_thresholds={"int8": {"embedding": {"cosine_min": 0.97}, "logits": {"top1": 0.9}}},
    )
    kinds = metrics.output_kinds(spec)
    t = metrics.thresholds_for(spec, "int8", kinds, {"emb": {"cosine_mean": 0.999}})
    assert t["emb"] == {"cosine_min": 0.97, "cosine_mean": 0.999}
    assert t["logits"] == {"top1": 0.9, "top5": metrics.DEFAULT_THRESHOLDS["int8"]["logits"]["top5"]}
    assert t["ids"] == {}
    assert metrics.thresholds_for(spec, "fp16", kinds)["emb"]["cosine_min"] == 0.999


def test_bad_thresholds_are_usage_errors() -> None:
    spec = _spec(output_kinds={"emb": "embedding", "logits": "logits"})
    kinds = metrics.output_kinds(spec)
    with pytest.raises(UsageError, match="does not apply"):
        metrics.thresholds_for(spec, "int8", kinds, {"emb": {"top1": 0.9}})
    with pytest.raises(UsageError, match=r"in \[0, 1\]"):
        metrics.thresholds_for(spec, "int8", kinds, {"logits": {"top1": 1.5}})
    with pytest.raises(UsageError, match="neither an output"):
        metrics.thresholds_for(spec, "int8", kinds, {"nope": {"top1": 0.9}})
    with pytest.raises(UsageError, match="no task-metric thresholds"):
        metrics.thresholds_for(spec, "int4", kinds)
