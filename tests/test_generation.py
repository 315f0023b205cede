"""Generation parity: greedy decoding through the KV cache in onnxruntime gives exactly the
framework's tokens (torch and flax exports, batch 1, 2 and 7, left padding); the stored
test data replays without torch or jax; ties, divergences, runtime failures and corrupt
files are reported as such."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import _decoder
from conftest import skip_unless_ci
from exporter import generation
from exporter.errors import BundleError, RunError, UsageError
from exporter.generation import Greedy, Prompts
from exporter.models.registry import Tolerance
from exporter.runtimes.base import Runtime

TOL = Tolerance(1e-5, 1e-4)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generation")


def _spec():
    from exporter.models import gpt2

    return gpt2.SPEC


# ---------------------------------------------------------------------------------------
# end to end (exports of the gpt2 family)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_onnxruntime_generates_the_frameworks_tokens(root: Path, framework: str) -> None:
    from exporter.runtimes.onnxruntime import OnnxRuntime

    spec, state, path = _decoder.export(root, framework)
    prompts = generation.default_prompts(1000, 128)
    assert [p.batch for p in prompts] == [1, 2, 7]
    assert any(min(p.lengths) < max(p.lengths) for p in prompts)  # left padding happens
    report = generation.check(_decoder.reference(spec, state, framework), OnnxRuntime(path, intra_op_threads=1), prompts, spec.tolerance("logits"), model="gpt2")
    assert report, "\n".join(report.failures())
    assert report.tokens_generated == (1 + 2 + 7) * 32
    assert report.steps_compared == report.tokens_generated  # no tie on this model and seed
    assert 0 < report.max_abs < 1e-5
    assert report.reference == ("torch" if framework == "torch" else "jax") and report.candidate == "onnxruntime"
    checks = report.checks()
    assert {c.output for c in checks} == {"generated_tokens", "step_logits"} and all(checks)
    d = report.to_dict()
    assert d["ok"] and d["tokens_generated"] == 320 and len(d["cases"]) == 3


@pytest.mark.slow
def test_stored_sets_replay_without_torch_or_jax(root: Path, tmp_path: Path) -> None:
    """The reference's runs written as test data replay in onnxruntime and the reference
    evaluator in a process that cannot import torch or jax."""
    spec, state, path = _decoder.export(root, "torch")
    prompts = generation.default_prompts(1000, 128)
    ref = _decoder.reference(spec, state, "torch")
    sets = []
    for k, p in enumerate(prompts):
        sets.append(generation.write_set(tmp_path / f"generation_set_{k}", p, generation.greedy(ref, p)).to_dict())
    shutil.copy(path, tmp_path / "model.onnx")
    code = f"""
import sys, json
sys.modules['torch'] = None; sys.modules['jax'] = None
from exporter import generation
from exporter.models.registry import Tolerance
from exporter.runtimes.base import load_runtime
sets = json.loads({repr(__import__('json').dumps(sets))})
for name in ('onnxruntime', 'reference'):
    rt = load_runtime(name, {str(tmp_path / 'model.onnx')!r})
    rep = generation.replay({str(tmp_path)!r}, sets, rt, Tolerance(1e-5, 1e-4))
    assert rep, rep.failures()
    print(rep.summary())
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("PASS, 3 cases, 320 tokens generated") == 2, done.stdout


@pytest.mark.slow
def test_stored_sets_replay_in_node(root: Path, tmp_path: Path) -> None:
    from exporter.runtimes import node

    try:
        node.check_available()
    except Exception as e:  # MissingDependencyError: Node.js or onnxruntime-node missing
        skip_unless_ci(str(e))
    spec, state, path = _decoder.export(root, "flax")
    prompts = generation.default_prompts(1000, 128, batches=(2,), new_tokens=8)
    ref = _decoder.reference(spec, state, "flax")
    entry = generation.write_set(tmp_path / "generation_set_0", prompts[0], generation.greedy(ref, prompts[0]))
    with node.NodeRuntime(path) as rt:
        report = generation.replay(tmp_path, [entry], rt, TOL)
    assert report, report.failures()
    assert report.candidate == "node" and report.tokens_generated == 16


def test_static_cache_gives_the_growing_caches_tokens(root: Path) -> None:
    spec = _spec()
    from exporter import rebuild

    rt = _decoder.reference(spec, rebuild.init_state(spec, seed=0), "torch")
    p = generation.make_prompts(1000, [6, 2], new_tokens=12, seed=1)
    a = generation.greedy(rt, p, static_cache=False)
    b = generation.greedy(rt, p, static_cache=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-6, rtol=1e-5)
    assert a.tokens.shape == (2, 12) and a.logits.shape == (2, 12, 1000)


# ---------------------------------------------------------------------------------------
# the comparison, on synthetic runs
# ---------------------------------------------------------------------------------------
def _run(tokens: list[list[int]], logits: np.ndarray) -> Greedy:
    return Greedy(np.asarray(tokens, dtype=np.int64), logits.astype(np.float32))


def _prompts(batch: int, n: int) -> Prompts:
    return Prompts("synthetic", np.zeros((batch, 3), np.int64), np.ones((batch, 3), np.int64), n)


def _logits(batch: int, n: int, vocab: int = 10, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    lg = rng.normal(size=(batch, n, vocab)).astype(np.float32)
    return lg, lg.argmax(-1).tolist()


def test_identical_runs_pass() -> None:
    lg, tok = _logits(2, 5)
    case = generation.compare(_run(tok, lg), _run(tok, lg.copy()), _prompts(2, 5), TOL)
    assert case.ok and case.steps_compared == 10 and case.max_abs == 0
    assert all(r.tokens_matched == 5 and r.ambiguous_step is None for r in case.rows)


def test_first_divergence_names_both_tokens_and_logits() -> None:
    lg, tok = _logits(2, 6)
    got = lg.copy()
    e = tok[1][3]
    other = int(np.argsort(lg[1, 3])[-2])
    got[1, 3, other] = lg[1, 3, e] + 1.0  # the candidate now prefers another token at step 3
    got_tok = [list(tok[0]), list(tok[1])]
    got_tok[1][3] = other
    got_tok[1][4] = 0  # after a divergence the rows differ anyway
    case = generation.compare(_run(tok, lg), _run(got_tok, got), _prompts(2, 6), TOL)
    assert not case.ok
    bad = case.rows[1]
    assert case.rows[0].ok and bad.divergence is not None
    d = bad.divergence
    assert (d.row, d.step, d.expected_token, d.got_token) == (1, 3, e, other)
    assert d.expected_logit_of_expected == pytest.approx(lg[1, 3, e])
    assert d.got_logit_of_got == pytest.approx(got[1, 3, other])
    assert d.expected_logit_of_got == pytest.approx(lg[1, 3, other])
    assert bad.steps_compared == 4 and bad.tokens_matched == 3
    report = generation.GenerationReport("m", "torch", "onnxruntime", (case,))
    text = "\n".join(report.failures())
    assert "row 1 diverges at step 3" in text and f"expected token {e}" in text and f"got token {other}" in text
    tokens_check = next(c for c in case.checks if c.output == "generated_tokens")
    assert not tokens_check.ok and "diverges at step 3" in tokens_check.reason


def test_a_tie_is_ambiguous_not_a_failure() -> None:
    lg, tok = _logits(1, 6)
    top = tok[0][2]
    second = int(np.argsort(lg[0, 2])[-2])
    lg[0, 2, second] = lg[0, 2, top] - 1e-6  # margin far under 2 * (atol + rtol * |top|)
    got = lg.copy()
    got[0, 2, second] += 3e-6  # within tolerance, and now the other token wins
    got_tok = [list(tok[0])]
    got_tok[0][2] = second
    case = generation.compare(_run(tok, lg), _run(got_tok, got), _prompts(1, 6), TOL)
    assert case.ok, generation.GenerationReport("m", "r", "c", (case,)).failures()
    row = case.rows[0]
    assert row.ambiguous_step == 2 and row.ambiguous_margin == pytest.approx(1e-6, rel=0.1)
    assert row.steps_compared == 3 and row.divergence is None
    report = generation.GenerationReport("m", "r", "c", (case,))
    assert report.ambiguous_steps == [("synthetic", 0, 2)] and "(1 ambiguous)" in report.summary()


def test_logits_out_of_tolerance_fail_even_with_the_same_tokens() -> None:
    lg, tok = _logits(1, 4)
    got = lg + 1e-3
    case = generation.compare(_run(tok, lg), _run(tok, got), _prompts(1, 4), TOL)
    assert not case.ok and case.rows[0].divergence is None
    assert case.rows[0].n_bad == 40 and case.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert "step logits out of tolerance" in generation.GenerationReport("m", "r", "c", (case,)).failures()[0]


def test_stored_top_k_logits_are_compared_at_their_ids() -> None:
    lg, tok = _logits(2, 5, vocab=300)
    full = _run(tok, lg)
    top = full.top(8)
    assert top.logits.shape == (2, 5, 8) and (top.logit_ids[..., 0] == full.tokens).all()
    assert generation.compare(top, _run(tok, lg.copy()), _prompts(2, 5), TOL).ok
    worse = lg.copy()
    worse[0, 1, int(top.logit_ids[0, 1, 5])] += 1e-2
    assert not generation.compare(top, _run(tok, worse), _prompts(2, 5), TOL).ok


class _Perturbed(Runtime):
    """A decoder runtime around another that changes one row's logits at one step, or fails."""

    name: ClassVar[str] = "perturbed"

    def __init__(self, inner: Runtime, *, step: int, row: int = 0, fail: bool = False) -> None:
        self.inner, self.step, self.row, self.fail = inner, step, row, fail
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.calls = 0

    def _run(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        out = dict(self.inner.run(inputs))
        if self.calls == self.step:
            if self.fail:
                raise RunError("synthetic failure")
            lg = out["logits"].copy()
            lg[self.row, -1, 7] = lg[self.row, -1].max() + 5.0
            out["logits"] = lg
        self.calls += 1
        return out


def test_a_broken_cache_step_is_caught_end_to_end() -> None:
    from exporter import rebuild

    spec = _spec()
    rt = _decoder.reference(spec, rebuild.init_state(spec, seed=0), "torch")
    prompts = [generation.make_prompts(1000, [5, 3], new_tokens=8, seed=2)]
    report = generation.check(rt, _Perturbed(rt, step=4, row=1), prompts, TOL)
    assert not report
    (row0, row1) = report.cases[0].rows
    assert row0.ok and row1.divergence is not None and row1.divergence.step == 4 and row1.divergence.got_token == 7
    failed = generation.check(rt, _Perturbed(rt, step=2, fail=True), prompts, TOL)
    assert not failed and "step 2 (decode)" in failed.cases[0].reason and "synthetic failure" in failed.cases[0].reason
    assert not failed.checks()[0].ok


# ---------------------------------------------------------------------------------------
# prompts, the decoder contract, stored files
# ---------------------------------------------------------------------------------------
def test_prompts_are_seeded_and_left_padded() -> None:
    p = generation.make_prompts(50, [4, 1, 3], new_tokens=5, seed=9)
    assert p.input_ids.shape == (3, 4) and p.lengths == [4, 1, 3] and p.batch == 3
    assert p.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]]
    assert (p.input_ids[p.attention_mask == 0] == 0).all()
    assert p.input_ids.tobytes() == generation.make_prompts(50, [4, 1, 3], new_tokens=5, seed=9).input_ids.tobytes()
    with pytest.raises(UsageError) as e:
        generation.make_prompts(0, [0, 2], new_tokens=0)
    assert len(e.value.problems) == 3
    with pytest.raises(UsageError, match="needs 48 positions; the model has 40"):
        generation.default_prompts(1000, 40)


def test_a_model_without_a_cache_is_not_a_decoder() -> None:
    from exporter import rebuild
    from exporter.models import registry
    from exporter.runtimes.torch import TorchRuntime

    spec = registry.get("mlp")
    rt = TorchRuntime(spec, rebuild.init_state(spec))
    with pytest.raises(UsageError, match="is not a decoder with a KV cache") as e:
        generation.greedy(rt, _prompts(1, 2))
    assert any("missing input 'input_ids'" in p for p in e.value.problems)
    assert any("no past_key_values" in p for p in e.value.problems)
    assert generation.is_decoder(["input_ids", "attention_mask", "past_key_values.0.key"], ["logits"])
    assert not generation.is_decoder(["x"], ["y"])


def test_stored_set_round_trip_and_corruption(tmp_path: Path) -> None:
    lg, tok = _logits(2, 4, vocab=20)
    p = _prompts(2, 4)
    entry = generation.write_set(tmp_path / "generation_set_0", p, _run(tok, lg))
    assert entry.logits == "full" and entry.to_dict()["prompt_lengths"] == [3, 3]
    prompts, stored = generation.read_set(tmp_path, generation.GenerationSet.from_dict(entry.to_dict()))
    assert prompts.input_ids.tobytes() == p.input_ids.tobytes() and stored.logits.tobytes() == lg.tobytes()
    small = generation.write_set(tmp_path / "generation_set_1", p, _run(tok, lg), full_logits_bytes=0)
    assert small.logits == "top-20" and generation.read_set(tmp_path, small)[1].logit_ids is not None
    with pytest.raises(BundleError, match="generation_set_9 is missing"):
        generation.read_set(tmp_path, generation.GenerationSet("generation_set_9", "x", 2, 4, (3, 3)))
    (tmp_path / "generation_set_0" / "expected_0.pb").write_bytes(b"\x00garbage")
    with pytest.raises(BundleError):
        generation.read_set(tmp_path, entry)
    with pytest.raises(BundleError, match="malformed"):
        generation.GenerationSet.from_dict({"dir": "x"})
    wrong = generation.GenerationSet(entry.dir.replace("0", "1"), "x", 3, 4, (3, 3, 3))
    with pytest.raises(BundleError, match="expected tokens shape"):
        generation.read_set(tmp_path, wrong)


def test_no_torch_or_jax_on_import() -> None:
    code = "import sys; import exporter.generation; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ}).returncode == 0


# ---------------------------------------------------------------------------------------
# bundles (the shared `exported` fixture: every registry model, both frameworks)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_decoder_bundles_carry_generation_parity(exported, framework: str) -> None:
    import json

    r = next(b for b in exported.results if b.model == "gpt2" and b.framework == framework)
    assert r.ok, "\n".join(r.parity.failures())
    gen = [c for c in r.parity.checks if c.case.startswith("generation ")]
    assert {c.output for c in gen} == {"generated_tokens", "step_logits"} and len(gen) == 6 and all(gen)
    manifest = json.loads((r.path / "manifest.json").read_text())
    section = manifest["generation"]
    assert [s["batch"] for s in section["sets"]] == [1, 2, 7] and all(s["new_tokens"] == 32 for s in section["sets"])
    assert section["summary"]["ok"] and section["summary"]["tokens_generated"] == 320
    assert section["reference"] == ("torch" if framework == "torch" else "jax")
    assert (r.path / "generation_set_2" / "expected_1.pb").is_file() and (r.path / generation.REPORT_FILE).is_file()
    assert not list(r.path.glob("test_data_set_gen*"))
    assert manifest["config"]["family"] == "gpt2" and manifest["config"]["source"] == "default"
    assert manifest["config"]["values"]["n_embd"] == 64 and len(manifest["config"]["sha256"]) == 64
    other = next(b for b in exported.results if b.model == "mlp")
    assert "generation" not in json.loads((other.path / "manifest.json").read_text())


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_verify_replays_the_generation_sets(exported, runtime: str) -> None:
    import exporter

    path = exported.out / "gpt2" / "torch"
    report = exporter.verify(path, runtime=runtime)
    assert report, "\n".join(report.failures())
    gen = [c for c in report.checks if c.case.startswith("generation ")]
    assert len(gen) == 6 and all(gen)


def test_verify_replays_the_generation_sets_in_node(exported) -> None:
    import exporter
    from exporter.runtimes import node

    try:
        node.check_available()
    except Exception as e:  # MissingDependencyError: Node.js or onnxruntime-node missing
        skip_unless_ci(str(e))
    report = exporter.verify(exported.out / "gpt2" / "flax", runtime="node")
    assert report and sum(c.case.startswith("generation ") for c in report.checks) == 6


def test_a_tampered_expected_token_fails_verify(exported, tmp_path: Path) -> None:
    import exporter
    from exporter.testdata import read_tensors, write_tensors

    bundle = tmp_path / "gpt2"
    shutil.copytree(exported.out / "gpt2" / "torch", bundle)
    d = bundle / "generation_set_1"
    stored = read_tensors(d, "expected")
    tokens = stored["tokens"].copy()
    tokens[1, 5] = (tokens[1, 5] + 1) % 1000
    for f in d.glob("expected_*.pb"):
        f.unlink()
    write_tensors(d, "expected", {**stored, "tokens": tokens})
    report = exporter.verify(bundle)
    assert not report
    failures = "\n".join(report.failures())
    assert "row 1 diverges at step 5" in failures and f"expected token {tokens[1, 5]}" in failures
