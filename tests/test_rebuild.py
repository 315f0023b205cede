"""prepare_state (prefixes, renames, flax layout, mismatch reports) and the torch / flax rebuilds."""
from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest

from exporter import layouts, rebuild
from exporter.errors import MissingDependencyError, StateMismatchError, UsageError
from exporter.layouts import Dense
from exporter.models import registry
from exporter.models.registry import ModelSpec, TensorSpec
from exporter.runtimes.torch import TorchRuntime



@pytest.fixture(scope="module")
def mlp() -> ModelSpec:
    return registry.get("mlp")


@pytest.fixture(scope="module")
def mlp_state(mlp: ModelSpec) -> dict[str, np.ndarray]:
    return rebuild.init_state(mlp, seed=0)


def _wrapped_torch() -> Any:
    """A model whose own submodule is called ``model`` (so ``model.`` must not be stripped)."""
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(3, 2)

        def forward(self, x: Any) -> Any:
            return self.model(x)

    return Wrapped()


WRAPPED = ModelSpec(
    name="wrapped",
    summary="test only",
    inputs=(TensorSpec("x", ("batch", 3)),),
    outputs=("y",),
    layout=(Dense("model", "model"),),
    torch_factory=_wrapped_torch,
    frameworks=("torch",),
    key_rules=((r"^lin\.", "model."),),
)


# -- prefixes and renames ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod.", "model.module."])
def test_wrapper_prefixes_are_stripped(mlp: ModelSpec, mlp_state: dict[str, np.ndarray], prefix: str) -> None:
    raw = {prefix + k: v for k, v in mlp_state.items()}
    state, report = rebuild.prepare_state(mlp, raw)
    assert report.ok and bool(report)
    assert sorted(state) == sorted(mlp_state)
    assert all(state[k].tobytes() == mlp_state[k].tobytes() for k in state)
    assert dict(report.renamed) == {prefix + k: k for k in mlp_state}


def test_prefix_is_kept_when_the_key_already_matches() -> None:
    raw = {"model.weight": np.zeros((2, 3), np.float32), "model.bias": np.zeros(2, np.float32)}
    state, report = rebuild.prepare_state(WRAPPED, raw)
    assert sorted(state) == ["model.bias", "model.weight"] and report.renamed == ()
    # ... and a DDP-wrapped copy of that model loses only the "module." prefix
    state, _ = rebuild.prepare_state(WRAPPED, {"module." + k: v for k, v in raw.items()})
    assert sorted(state) == ["model.bias", "model.weight"]


def test_model_key_rules_then_user_renames(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    raw = {"lin.weight": np.ones((2, 3), np.float32), "lin.bias": np.ones(2, np.float32)}
    state, report = rebuild.prepare_state(WRAPPED, raw)
    assert sorted(state) == ["model.bias", "model.weight"]
    assert ("lin.weight", "model.weight") in report.renamed

    raw = {k.replace("hidden", "fc1").replace("output", "fc2"): v for k, v in mlp_state.items()}
    with pytest.raises(StateMismatchError, match="missing key 'hidden.weight'"):
        rebuild.prepare_state(mlp, raw)
    state, report = rebuild.prepare_state(mlp, raw, rename=[(r"^fc1\.", "hidden."), (r"^fc2\.", "output.")])
    assert report.ok and sorted(state) == sorted(mlp_state)


def test_bad_rename_regex_is_a_usage_error(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    with pytest.raises(UsageError, match="not a valid regular expression"):
        rebuild.prepare_state(mlp, mlp_state, rename=[("(", "x")])


def test_non_parameter_buffers_are_dropped() -> None:
    import torch

    spec = registry.get("cnn")
    torch.manual_seed(0)
    raw = {k: v.numpy() for k, v in spec.torch_factory().state_dict().items()}
    assert "bn1.num_batches_tracked" in raw
    state, report = rebuild.prepare_state(spec, raw)
    assert "bn1.num_batches_tracked" not in state
    assert report.dropped == ("bn1.num_batches_tracked", "bn2.num_batches_tracked")


# -- mismatch reports -----------------------------------------------------------------------


def _broken(mlp_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raw = {k: v for k, v in mlp_state.items() if k != "output.bias"}  # missing
    raw["extra.weight"] = np.zeros(3, np.float32)  # unexpected
    raw["hidden.weight"] = mlp_state["hidden.weight"].T.copy()  # shape
    raw["hidden.bias"] = mlp_state["hidden.bias"].astype(np.float64)  # dtype
    return raw


def test_strict_mismatch_lists_every_problem_sorted_and_names_the_file(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    with pytest.raises(StateMismatchError) as info:
        rebuild.prepare_state(mlp, _broken(mlp_state), source="ckpt/model.safetensors")
    msg = str(info.value)
    assert "ckpt/model.safetensors" in msg and "'mlp'" in msg
    assert "1 missing, 1 unexpected, 2 mismatched" in msg
    problems = msg.splitlines()[1:]
    assert problems == sorted(problems) and len(problems) == 4
    assert "missing key 'output.bias'" in msg
    assert "unexpected key 'extra.weight'" in msg
    assert "hidden.weight: got shape (20, 256) float32, expected shape (256, 20) float32" in msg
    assert "hidden.bias: got shape (256,) float64, expected shape (256,) float32" in msg


def test_non_strict_returns_the_report(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    state, report = rebuild.prepare_state(mlp, _broken(mlp_state), strict=False, source="x.pt")
    assert not report and not report.ok
    assert sorted(state) == ["output.weight"]  # only what fits
    assert report.missing == ("output.bias",) and report.unexpected == ("extra.weight",)
    assert len(report.mismatched) == 2
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is False and d["source"] == "x.pt" and d["model"] == "mlp"
    assert report.lines() == sorted(report.lines())


def test_clean_state_reports_ok(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    state, report = rebuild.prepare_state(mlp, mlp_state)
    assert report.ok and report.lines() == [] and report.layout == "torch"


# -- flax layout in -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_flax_layout_state_is_converted(name: str) -> None:
    spec = registry.get(name)
    state = rebuild.init_state(spec, seed=0)
    flat = layouts.to_flax_flat(state, spec.layout)
    got, report = rebuild.prepare_state(spec, flat)
    assert report.layout == "flax" and report.ok
    assert sorted(got) == sorted(state)
    assert all(got[k].tobytes() == state[k].tobytes() for k in state)


def test_bare_params_tree_is_accepted(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    flat = layouts.to_flax_flat(mlp_state, mlp.layout)
    bare = {k.removeprefix("params/"): v for k, v in flat.items()}
    got, report = rebuild.prepare_state(mlp, bare)
    assert report.ok and all(got[k].tobytes() == mlp_state[k].tobytes() for k in mlp_state)


def test_flax_mismatch_names_the_flax_key(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    flat = layouts.to_flax_flat(mlp_state, mlp.layout)
    flat["params/hidden/kernel"] = flat["params/hidden/kernel"].T.copy()
    del flat["params/output/bias"]
    with pytest.raises(StateMismatchError) as info:
        rebuild.prepare_state(mlp, flat, source="f.msgpack")
    msg = str(info.value)
    assert "params/hidden/kernel: got shape (256, 20) float32, expected shape (20, 256) float32" in msg
    assert "missing key 'params/output/bias'" in msg


# -- rebuild and run ------------------------------------------------------------------------


def test_torch_module_refuses_a_state_that_does_not_fit(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    with pytest.raises(StateMismatchError, match="missing key 'output.bias'") as info:
        rebuild.torch_module(mlp, _broken(mlp_state))
    assert "unexpected key 'extra.weight'" in str(info.value)


def test_flax_variables_refuses_a_state_that_does_not_fit(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    with pytest.raises(StateMismatchError, match="missing canonical key 'output.bias'"):
        rebuild.flax_variables(mlp, {k: v for k, v in mlp_state.items() if k != "output.bias"})


def test_run_checks_input_names(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    runtime = TorchRuntime.from_module(mlp, rebuild.torch_module(mlp, mlp_state))
    with pytest.raises(UsageError, match="missing input 'x'") as info:
        runtime.run({"z": np.zeros((1, 20), np.float32)})
    assert "unexpected input 'z'" in str(info.value)


def test_framework_checks(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    with pytest.raises(UsageError, match="unknown framework 'tf'; expected 'torch' or 'flax'"):
        rebuild.init_state(mlp, framework="tf")
    with pytest.raises(UsageError, match="model 'wrapped' has no flax build"):
        rebuild.init_state(WRAPPED, framework="flax")
    with pytest.raises(UsageError, match="model 'wrapped' has no flax build"):
        rebuild.flax_variables(WRAPPED, {})
    flax_only = ModelSpec(
        name="flax_only", summary="test only", inputs=mlp.inputs, outputs=mlp.outputs, layout=mlp.layout,
        flax_factory=mlp.flax_factory, frameworks=("flax",),
    )
    with pytest.raises(UsageError, match="model 'flax_only' has no torch build"):
        rebuild.torch_module(flax_only, mlp_state)


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch, mlp: ModelSpec) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(MissingDependencyError, match=r"rebuilding model 'mlp' in torch needs 'torch'.*pip install 'exporter\[torch\]'"):
        rebuild.torch_module(mlp, {})
    with pytest.raises(MissingDependencyError, match=r"pip install 'exporter\[torch\]'"):
        rebuild.init_state(mlp, framework="torch")


@pytest.mark.parametrize("blocked", ["jax", "flax"])
def test_missing_jax_or_flax_names_the_extra(monkeypatch: pytest.MonkeyPatch, mlp: ModelSpec, blocked: str) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(MissingDependencyError, match=rf"needs '{blocked}'.*pip install 'exporter\[jax\]'"):
        rebuild.flax_variables(mlp, {})
    with pytest.raises(MissingDependencyError, match=r"pip install 'exporter\[jax\]'"):
        rebuild.init_state(mlp, framework="flax")


def test_expected_state_falls_back_to_flax_without_torch(monkeypatch: pytest.MonkeyPatch, mlp: ModelSpec) -> None:
    rebuild._EXPECTED_CACHE.clear()
    monkeypatch.setitem(sys.modules, "torch", None)
    try:
        assert rebuild.expected_state(mlp)["hidden.weight"] == ((256, 20), "float32")
    finally:
        rebuild._EXPECTED_CACHE.clear()


def test_prefix_strip_and_flax_round_trip_give_identical_outputs(mlp: ModelSpec, mlp_state: dict[str, np.ndarray]) -> None:
    """A DDP-prefixed torch save loaded back gives bit-identical outputs (the seed's sanity check)."""
    original = rebuild.torch_module(mlp, mlp_state)
    state, _ = rebuild.prepare_state(mlp, {"module." + k: v.copy() for k, v in mlp_state.items()})
    rebuilt = rebuild.torch_module(mlp, state)
    x = mlp.example_inputs({"batch": 5}, seed=9)
    a = TorchRuntime.from_module(mlp, original).run(x)["y"]
    assert a.tobytes() == TorchRuntime.from_module(mlp, rebuilt).run(x)["y"].tobytes()


def test_a_model_without_builds_has_no_expected_state() -> None:
    numpy_only = ModelSpec(
        name="numpy_only", summary="test only", inputs=(TensorSpec("x", ("batch", 3)),), outputs=("y",), layout=(),
        frameworks=(),
    )
    with pytest.raises(UsageError, match="model 'numpy_only' has neither a torch nor a flax build"):
        rebuild.expected_state(numpy_only)
