"""Unit tests of ``exporter.parity``: compare, the report, the sweep and check (numpy-only runtimes)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from exporter import parity
from exporter.errors import ParityError, RunError, UsageError
from exporter.parity import OutputCheck, ParityReport, compare, relative_floor
from exporter.models.registry import DEFAULT_TOLERANCES, ModelSpec, TensorSpec, Tolerance
from exporter.runtimes.base import IOSpec, Runtime

F32 = DEFAULT_TOLERANCES["float32"]


def fixed(atol: float, rtol: float) -> Callable[[str, str], Tolerance]:
    return lambda output, dtype: Tolerance(atol, rtol)


def one(
    reference: Any, candidate: Any, tol: Callable[[str, str], Tolerance] = fixed(F32.atol, F32.rtol)
) -> OutputCheck:
    (check,) = compare(
        {"y": np.asarray(reference)}, {"y": np.asarray(candidate)}, tol, case="batch=2", dims={"batch": 2}
    )
    return check


# ---------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------


def test_identical_outputs_pass_with_zero_error() -> None:
    r = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    c = one(r, r.copy())
    assert c.ok and bool(c)
    assert (c.max_abs, c.max_rel, c.mean_abs, c.p99_abs, c.n_bad, c.nan_mismatch) == (0.0, 0.0, 0.0, 0.0, 0, 0)
    assert (c.n_total, c.shape, c.dtype, c.case, c.dims) == (12, (3, 4), "float32", "batch=2", {"batch": 2})
    assert (c.atol, c.rtol) == (F32.atol, F32.rtol)


def test_tolerance_edges_are_inclusive() -> None:
    # Powers of two: every value is exact, so the bound atol + rtol*|r| = 0.25 + 0.5*2 = 1.25 is exact too.
    tol = fixed(0.25, 0.5)
    r = np.array([2.0, -2.0, 0.0])
    assert one(r, r + np.array([1.25, -1.25, 0.25]), tol).ok
    over = one(r, r + np.array([1.25 + 2**-20, -1.25, -(0.25 + 2**-20)]), tol)
    assert not over.ok and over.n_bad == 2 and over.reason == ""
    assert over.max_abs == pytest.approx(1.25 + 2**-20)


def test_error_statistics() -> None:
    r = np.zeros(100)
    err = np.arange(100) * 1e-7
    c = one(r, r + err)
    assert c.max_abs == pytest.approx(99e-7)
    assert c.mean_abs == pytest.approx(err.mean())
    assert c.p99_abs == pytest.approx(np.percentile(err, 99))
    assert c.n_bad == 0 and c.ok  # all within atol 1e-5
    bad = one(r, r + np.arange(100) * 1e-6)  # elements 11..99 exceed 1e-5
    assert bad.n_bad == 89 and not bad.ok


def test_relative_error_floor() -> None:
    assert relative_floor(1e-5, 1e-4, "float32") == pytest.approx(0.1)
    assert relative_floor(1e-3, 0.0, "float32") == 1e-3
    assert relative_floor(0.0, 1e-3, "float32") == np.finfo(np.float32).tiny
    assert relative_floor(0.0, 0.0, "int64") == 1.0
    # near zero the relative error does not blow up: 1e-9 off a reference of 1e-9
    near_zero = one(np.float32([1e-9, 0.0]), np.float32([2e-9, 1e-9]))
    assert near_zero.ok and near_zero.max_rel == pytest.approx(1e-9 / 0.1) and near_zero.rel_floor == pytest.approx(0.1)
    # above the floor it is the plain relative error
    big = one(np.float64([100.0]), np.float64([100.005]))
    assert big.max_rel == pytest.approx(5e-5) and big.ok


def test_relative_error_reads_against_rtol() -> None:
    """The documented property: max_rel <= rtol implies a pass; a pass implies max_rel < 2*rtol."""
    rng = np.random.default_rng(0)
    tol = fixed(1e-5, 1e-4)
    for _ in range(300):
        r = rng.normal(size=20) * 10.0 ** rng.integers(-7, 3)
        c = r + rng.normal(size=20) * 10.0 ** rng.integers(-8, 0)
        check = one(r, c, tol)
        if check.max_rel <= 1e-4:
            assert check.ok
        if check.ok:
            assert check.max_rel < 2e-4


@pytest.mark.parametrize(
    ("reference", "candidate", "mismatches"),
    [
        ([np.nan, 1.0], [0.0, 1.0], 1),
        ([1.0, 1.0], [np.nan, 1.0], 1),
        ([np.inf, 1.0], [-np.inf, 1.0], 1),
        ([np.inf, -np.inf], [1e30, -np.inf], 1),
        ([1.0, 2.0], [np.inf, np.nan], 2),
    ],
    ids=["nan-vs-number", "number-vs-nan", "inf-sign", "inf-vs-finite", "two"],
)
def test_nan_inf_mismatch_always_fails(reference: list[float], candidate: list[float], mismatches: int) -> None:
    huge = fixed(1e30, 1e30)  # no tolerance excuses a non-finite mismatch
    for dtype in (np.float32, np.float64):
        c = one(np.array(reference, dtype), np.array(candidate, dtype), huge)
        assert not c.ok and c.nan_mismatch == mismatches and c.n_bad == mismatches
        assert all(np.isfinite(v) for v in (c.max_abs, c.max_rel, c.mean_abs, c.p99_abs))  # stats over finite pairs


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_all_finite_fast_path_gives_the_masked_numbers(dtype: type) -> None:
    """_stats skips the masking copies when every value is finite: the statistics must be
    the very numbers the masked path gives for the same finite values (a NaN in both
    arrays sends the same values through the masked path)."""
    from exporter.parity import _stats

    rng = np.random.default_rng(3)
    r = rng.standard_normal(4099).astype(dtype)
    c = (r + rng.standard_normal(r.shape) * 1e-3).astype(dtype)
    c[::97] = r[::97] + 1  # some values out of tolerance
    fast = _stats(r, c, 1e-3, 1e-3, 1e-6)
    masked = _stats(np.append(r, np.nan).astype(dtype), np.append(c, np.nan).astype(dtype), 1e-3, 1e-3, 1e-6)
    assert masked.pop("n_total") == fast.pop("n_total") + 1
    assert fast == masked and fast["n_bad"] >= len(r[::97])


def test_matching_non_finite_values_are_equal() -> None:
    r = np.float32([np.nan, np.inf, -np.inf, 1.0])
    c = one(r, r.copy())
    assert c.ok and c.nan_mismatch == 0 and c.max_abs == 0.0
    all_nan = one(np.full(3, np.nan), np.full(3, np.nan))
    assert all_nan.ok and all_nan.max_abs == 0.0


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_int_and_bool_outputs_are_exact(dtype: type) -> None:
    loose = fixed(10.0, 10.0)  # ignored for integer/bool outputs
    r = np.array([1, 0, 1, 1], dtype)
    assert one(r, r.copy(), loose).ok
    c = one(r, np.array([1, 0, 0, 1], dtype), loose)
    assert not c.ok and c.n_bad == 1 and (c.atol, c.rtol, c.rel_floor) == (0.0, 0.0, 1.0)


def test_int_exact_beyond_float_precision_and_widths() -> None:
    big = np.array([2**53 + 1], np.int64)
    assert not one(big, np.array([2**53], np.int64)).ok  # float64 would round them equal
    assert one(np.array([1, 2], np.int64), np.array([1, 2], np.int32)).ok  # width differs, values equal


def test_dtype_mismatch_fails() -> None:
    c = one(np.float32([1.0, 2.0]), np.float64([1.0, 2.0]))
    assert not c.ok and c.reason == "dtype float64, expected float32" and c.max_abs == 0.0
    assert not one(np.int64([1, 0]), np.float32([1, 0])).ok


def test_missing_extra_and_shape_mismatch() -> None:
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.float32), "c": np.zeros(2, np.float32)}
    cand = {
        "b": np.zeros((3, 2), np.float32),
        "c": np.zeros(2, np.float32),
        "z": np.zeros(4, np.int64),
        "e": np.zeros(1),
    }
    checks = compare(ref, cand, fixed(1e-5, 1e-4), case="batch=2")
    by = {c.output: c for c in checks}
    assert [c.output for c in checks] == ["a", "b", "c", "e", "z"]  # reference order, then extras sorted
    assert not by["a"].ok and by["a"].reason == "missing from the candidate (it has: b, c, e, z)"
    assert not by["b"].ok and by["b"].reason == "shape (3, 2), expected (2, 3)"
    assert by["a"].max_abs is None and by["b"].n_bad == by["b"].n_total == 6
    assert by["c"].ok
    assert (
        not by["z"].ok
        and by["z"].reason == "unexpected output: not produced by the reference"
        and by["z"].shape == (4,)
    )


def test_overflowing_error_stays_valid_json() -> None:
    c = one(np.float64([1e308]), np.float64([-1e308]))
    assert not c.ok and c.max_abs == np.finfo(np.float64).max
    json.dumps(c.to_dict(), allow_nan=False)


def test_empty_and_scalar_outputs() -> None:
    assert one(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)).ok
    scalar = one(np.float32(1.0), np.float32(1.5))
    assert not scalar.ok and scalar.shape == () and scalar.n_total == 1


# ---------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------


SPEC = ModelSpec(
    name="fake",
    summary="numpy-only model for parity tests",
    inputs=(TensorSpec("a", ("batch", 3)), TensorSpec("m", ("batch", "seq"), "int64", 0, 5)),
    outputs=("out", "count"),
    layout=(),
    dims={"batch": 2, "seq": 4},
    output_tolerances={"out": Tolerance(1e-4, 1e-3)},
    frameworks=(),
)


def _model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"out": inputs["a"] * 2 + 0.5, "count": inputs["m"].sum(axis=1)}


class NumpyRuntime(Runtime):
    """``_model`` plus an optional fault injected at some batch sizes."""

    name: ClassVar[str] = "numpy"

    def __init__(
        self, fault: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None, name: str = "numpy"
    ) -> None:
        self.inputs = tuple(IOSpec.from_tensor_spec(t) for t in SPEC.inputs)
        self.outputs = SPEC.outputs
        self.fault = fault
        self.name = name  # type: ignore[misc]

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = _model(inputs)
        return self.fault(inputs["a"].shape[0], out) if self.fault else out


def _faulty(batch: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(out)
    if batch in (7, 64):
        out["out"] = out["out"] + np.float32(1e-2)
    if batch == 2:
        out["count"] = out["count"] + 1
    if batch == 64:
        raise RunError("Reshape: the input tensor cannot be reshaped to the requested shape {2,3}\n(baked)")
    return out


@pytest.fixture(scope="module")
def failing() -> ParityReport:
    return parity.check(SPEC, NumpyRuntime(name="torch"), NumpyRuntime(_faulty, name="onnxruntime"))


def test_check_passes_on_equal_runtimes() -> None:
    report = parity.check(SPEC, NumpyRuntime(name="torch"), NumpyRuntime(name="onnxruntime"))
    assert report.ok and bool(report) and report.failures() == []
    assert report.cases == ["batch=1,seq=4", "batch=2,seq=4", "batch=7,seq=4", "batch=64,seq=4"]
    assert report.outputs == ["out", "count"] and len(report.checks) == 8
    assert (report.model, report.framework, report.reference, report.candidate, report.seed) == (
        "fake",
        "torch",
        "torch",
        "onnxruntime",
        0,
    )
    assert report.raise_for_failure() is report
    assert "PASS, 8 checks over 4 cases" in report.table()


def test_check_is_strict_and_lists_every_failure_sorted(failing: ParityReport) -> None:
    assert not failing and not failing.ok
    lines = failing.failures()
    # sorted by output, then case in sweep order (batch=7 before batch=64)
    assert [line.split(":")[0] for line in lines] == [
        "count @ batch=2,seq=4",
        "count @ batch=64,seq=4",
        "out @ batch=7,seq=4",
        "out @ batch=64,seq=4",
    ]
    assert "2/2 elements out of tolerance" in lines[0] and "tolerance atol=0 rtol=0 (int64)" in lines[0]
    assert "onnxruntime failed to run: Reshape: the input tensor cannot be reshaped" in lines[1]
    assert "max_abs 0.01" in lines[2] and "21/21 elements out of tolerance" in lines[2]
    assert "tolerance atol=0.0001 rtol=0.001 (float32)" in lines[2]  # the spec's per-output override
    with pytest.raises(ParityError, match="parity failed for model 'fake'") as info:
        failing.raise_for_failure()
    message = str(info.value)
    assert info.value.exit_code == 1
    assert message.count("\n  - ") == 4 and all(line in message for line in lines)
    assert "\n" not in lines[1]  # multi-line runtime errors are folded into one line


def test_table_is_readable(failing: ParityReport) -> None:
    table = failing.table()
    assert table.splitlines()[0] == "fake (torch): onnxruntime vs torch: FAIL, 8 checks over 4 cases, 4 failing"
    assert table.count("FAIL") == 5 and "ok" in table
    assert "FAIL (onnxruntime failed to run" in table


def test_json_round_trip(failing: ParityReport) -> None:
    text = failing.to_json()

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=no_constants)
    assert data["format"] == "exporter-parity" and data["ok"] is False and len(data["failures"]) == 4
    assert ParityReport.from_json(text) == failing
    assert ParityReport.from_dict(failing.to_dict()) == failing
    assert json.loads(json.dumps(failing.to_dict())) == data  # plain data, no custom encoder
    with pytest.raises(UsageError, match="not a parity report"):
        ParityReport.from_dict({"format": "something-else"})


def test_junit_xml(failing: ParityReport) -> None:
    root = ET.fromstring(failing.to_junit_xml())
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(failing.checks) == 8
    assert suite.get("tests") == "8" and suite.get("failures") == "4" and root.get("failures") == "4"
    failed = sorted(tc.get("name") for tc in cases if tc.find("failure") is not None)
    assert failed == ["count[batch=2,seq=4]", "count[batch=64,seq=4]", "out[batch=64,seq=4]", "out[batch=7,seq=4]"]
    failure = next(tc for tc in cases if tc.get("name") == "out[batch=7,seq=4]").find("failure")
    assert "max_abs 0.01" in failure.get("message") and json.loads(failure.text)["n_bad"] == 21
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["model"] == "fake" and props["candidate"] == "onnxruntime"
    passing = parity.check(SPEC, NumpyRuntime(), NumpyRuntime(), cases=[{"batch": 1}])
    root = ET.fromstring(passing.to_junit_xml())
    assert root.get("failures") == "0" and root.find(".//failure") is None


def test_empty_report_fails() -> None:
    report = ParityReport("fake", "torch", "torch", "onnxruntime", checks=())
    assert not report and report.failures() == ["no outputs were compared (no cases were run)"]
    assert ET.fromstring(report.to_junit_xml()).find(".//failure") is not None
    with pytest.raises(UsageError, match="nothing to compare"):
        parity.check(SPEC, NumpyRuntime(), NumpyRuntime(), cases=[])


# ---------------------------------------------------------------------------------------
# tolerances
# ---------------------------------------------------------------------------------------


def test_tolerances_are_dtype_aware_with_overrides() -> None:
    tol = parity.tolerance_for(SPEC)
    assert tol("count", "float32") == DEFAULT_TOLERANCES["float32"]
    assert tol("count", "float16") == DEFAULT_TOLERANCES["float16"]
    assert tol("out", "float32") == Tolerance(1e-4, 1e-3)  # spec per-output
    tol = parity.tolerance_for(SPEC, atol=1e-6)
    assert tol("count", "float32") == Tolerance(1e-6, F32.rtol) and tol("out", "float32") == Tolerance(1e-6, 1e-3)
    tol = parity.tolerance_for(SPEC, atol=1e-6, rtol=0.0, output_tolerances={"out": (0.5, 0.25)})
    assert tol("out", "float32") == Tolerance(0.5, 0.25) and tol("count", "float64") == Tolerance(1e-6, 0.0)
    assert parity.tolerance_for(None)("y", "float32") == F32
    with pytest.raises(UsageError, match="model 'fake' does not have: outt; its outputs are: out, count"):
        parity.tolerance_for(SPEC, output_tolerances={"outt": (1e-3, 1e-3)})
    with pytest.raises(UsageError, match="atol must be a finite number >= 0"):
        parity.tolerance_for(SPEC, atol=-1.0)
    with pytest.raises(UsageError, match="rtol must be a finite number >= 0"):
        parity.tolerance_for(SPEC, output_tolerances={"out": {"atol": 0.0, "rtol": float("nan")}})


def test_check_uses_overrides() -> None:
    # "out" is in [0.5, 2.5): the spec's per-output tolerance allows at most 1e-4 + 1e-3 * 2.5
    slightly_off = NumpyRuntime(lambda b, out: {**out, "out": out["out"] + np.float32(5e-3)})
    assert not parity.check(SPEC, NumpyRuntime(), slightly_off, cases=[{"batch": 2}])
    assert parity.check(SPEC, NumpyRuntime(), slightly_off, cases=[{"batch": 2}], atol=1e-2)
    report = parity.check(
        SPEC, NumpyRuntime(), slightly_off, cases=[{"batch": 2}], output_tolerances={"out": Tolerance(6e-3, 0.0)}
    )
    assert report and report.checks[0].atol == 6e-3


# ---------------------------------------------------------------------------------------
# cases and inputs
# ---------------------------------------------------------------------------------------


def test_sweep_cases() -> None:
    assert parity.sweep_cases(SPEC) == [{"batch": b, "seq": 4} for b in (1, 2, 7, 64)]
    assert parity.sweep_cases(SPEC, (3, 3, 1), {"seq": (8, 17)}) == [
        {"batch": 3, "seq": 8},
        {"batch": 3, "seq": 17},
        {"batch": 1, "seq": 8},
        {"batch": 1, "seq": 17},
    ]
    assert parity.sweep_cases(SPEC, [5], {"seq": 9}) == [{"batch": 5, "seq": 9}]
    with pytest.raises(UsageError, match="bad sweep") as info:
        parity.sweep_cases(SPEC, (0, "2"), {"heads": 3, "seq": (-1,)})
    message = str(info.value)
    assert "batch size 0 is not a positive int" in message and "batch size '2'" in message
    assert "unknown dim 'heads'; model 'fake' has dynamic dims: batch, seq" in message
    assert "size -1 of dim 'seq'" in message
    with pytest.raises(UsageError, match="no batch sizes given"):
        parity.sweep_cases(SPEC, ())
    with pytest.raises(UsageError, match="bad case") as info:
        parity.check(SPEC, NumpyRuntime(), NumpyRuntime(), cases=[{"batch": 0, "heads": 2}])
    assert "unknown dim 'heads'" in str(info.value) and "size 0 of dim 'batch'" in str(info.value)


def test_check_catches_a_batch_size_baked_in() -> None:
    """A candidate that only works at its export batch size fails at every other size."""

    def baked(batch: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if batch != 2:
            raise RunError(f"Reshape: cannot reshape {batch}x3 to 2x3")
        return out

    report = parity.check(SPEC, NumpyRuntime(), NumpyRuntime(baked))
    assert {c.case for c in report.failed_checks()} == {"batch=1,seq=4", "batch=7,seq=4", "batch=64,seq=4"}
    assert all(c.ok for c in report.checks if c.case == "batch=2,seq=4")


def test_seeded_inputs_are_deterministic() -> None:
    seen: list[np.ndarray] = []

    def record(batch: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(out["out"].copy())
        return out

    parity.check(SPEC, NumpyRuntime(), NumpyRuntime(record), cases=[{"batch": 3}], seed=5)
    parity.check(SPEC, NumpyRuntime(), NumpyRuntime(record), cases=[{"batch": 3}], seed=5)
    parity.check(SPEC, NumpyRuntime(), NumpyRuntime(record), cases=[{"batch": 3}], seed=6)
    assert np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[0], seen[2])


def test_user_inputs_from_npz(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npz"
    np.savez(path, a=np.ones((5, 3), np.float32), m=np.ones((5, 11), np.int64))
    report = parity.check(SPEC, NumpyRuntime(), NumpyRuntime(), cases=[{"batch": 1}], inputs=path)
    assert report and report.cases == ["batch=1,seq=4", "inputs.npz"]
    assert report.checks[-1].dims == {"batch": 5, "seq": 11} and report.checks[-1].shape == (5,)
    assert parity.check(SPEC, NumpyRuntime(), NumpyRuntime(), cases=[], inputs=parity.load_inputs(path)).cases == [
        "user inputs"
    ]

    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.ones((5, 3), np.float64), x=np.ones(2))
    with pytest.raises(UsageError, match="bad.npz do not fit model 'fake'") as info:
        parity.check(SPEC, NumpyRuntime(), NumpyRuntime(), inputs=bad)
    message = str(info.value)
    assert "missing input 'm'" in message and "unexpected input 'x'" in message and "dtype float64" in message

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, a=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(UsageError, match="cannot be read as .npz"):
        parity.load_inputs(pickled)
    with pytest.raises(UsageError, match="does not exist"):
        parity.load_inputs(tmp_path / "nope.npz")


# ---------------------------------------------------------------------------------------
# honest failures: only a candidate's RunError is a verdict
# ---------------------------------------------------------------------------------------


def test_a_bug_in_the_candidate_propagates() -> None:
    def bug(batch: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise TypeError("unsupported operand type(s)")  # our own code failing, not the runtime

    with pytest.raises(TypeError, match="unsupported operand"):
        parity.check(SPEC, NumpyRuntime(), NumpyRuntime(bug), cases=[{"batch": 2}])


def test_a_failing_reference_is_not_a_parity_failure() -> None:
    def broken(batch: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RunError("torch failed at batch 2")

    with pytest.raises(RunError, match="torch failed"):
        parity.check(SPEC, NumpyRuntime(broken, name="torch"), NumpyRuntime(), cases=[{"batch": 2}])


def test_recorded_tolerances_are_the_base_and_overrides_win() -> None:
    recorded = {"per_output": {"out": Tolerance(1e-3, 1e-2)}, "defaults": {"float32": Tolerance(2e-5, 2e-4)}}
    tol = parity.tolerance_for(None, recorded=recorded)
    assert tol("out", "float32") == Tolerance(1e-3, 1e-2)
    assert tol("other", "float32") == Tolerance(2e-5, 2e-4)  # recorded per-dtype
    assert tol("other", "float16") == DEFAULT_TOLERANCES["float16"]  # nothing recorded: the defaults
    assert parity.tolerance_for(None, atol=0.5, recorded=recorded)("out", "float32") == Tolerance(0.5, 1e-2)
    with pytest.raises(UsageError, match="no tolerance known for output 'z' of dtype 'complex64'"):
        tol("z", "complex64")
    assert parity.tolerance_for(None, atol=0.0, rtol=0.0)("z", "complex64") == Tolerance(0.0, 0.0)


def test_a_candidate_that_fixed_a_dim_fails_the_other_sizes() -> None:
    """An export whose declared input has a static batch (e.g. torch.export specialised it)."""
    static = NumpyRuntime()
    static.inputs = tuple(IOSpec(i.name, i.dtype, (2, *i.shape[1:])) for i in static.inputs)
    report = parity.check(SPEC, NumpyRuntime(), static, cases=[{"batch": 1}, {"batch": 2}])
    assert {c.case for c in report.failed_checks()} == {"batch=1,seq=4"}
    assert all("numpy failed to run: the inputs do not fit it" in c.reason for c in report.failed_checks())
