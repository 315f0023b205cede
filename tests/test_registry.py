"""The model registry: duplicate names refused, unknown names listed, user plugins loaded,
and every registered model covered by the parity tests (Optimum's test_all_models_tested)."""
from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exporter import layouts
from exporter.errors import UnknownModelError, UsageError
from exporter.models import registry
from exporter.models.registry import ModelSpec, TensorSpec, Tolerance

TESTS = Path(__file__).parent


def _spec(name: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        summary="test",
        inputs=(TensorSpec("x", ("batch", 3)),),
        outputs=("y",),
        layout=(layouts.Dense("fc", "fc"),),
    )


def test_builtins_are_registered():
    assert {"mlp", "cnn", "transformer", "minilm"} <= set(registry.names())
    assert registry.names() == sorted(registry.names())


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'.*known models: .*mlp") as e:
        registry.get("nope")
    assert "register" in str(e.value)


def test_duplicate_name_is_refused():
    spec = registry.register(_spec("dup_test"))
    try:
        with pytest.raises(UsageError, match="already registered"):
            registry.register(_spec("dup_test"))
        assert registry.register(spec) is spec  # re-registering the same object is a no-op
    finally:
        registry.unregister("dup_test")


def test_plugin_module_registers_a_model(tmp_path, monkeypatch):
    (tmp_path / "my_models_plugin.py").write_text(
        textwrap.dedent(
            """
            from exporter import layouts
            from exporter.models.registry import ModelSpec, TensorSpec, register
            register(ModelSpec(name="plugin_model", summary="from a plugin",
                               inputs=(TensorSpec("x", ("batch", 3)),), outputs=("y",),
                               layout=(layouts.Dense("fc", "fc"),)))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry.load_plugins("my_models_plugin")
        assert registry.get("plugin_model").summary == "from a plugin"
    finally:
        registry.unregister("plugin_model")
        sys.modules.pop("my_models_plugin", None)


def test_unimportable_plugin_is_a_usage_error():
    with pytest.raises(UsageError, match="registry module 'no_such_module_xyz' cannot be imported"):
        registry.load_plugins(["no_such_module_xyz"])


def test_example_inputs_are_deterministic_and_typed():
    spec = registry.get("mlp")
    a = spec.example_inputs({"batch": 7}, seed=3)
    b = spec.example_inputs({"batch": 7}, seed=3)
    c = spec.example_inputs({"batch": 7}, seed=4)
    assert a["x"].shape == (7, 20) and a["x"].dtype == np.float32
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])
    with pytest.raises(UsageError, match="no size given for dynamic dim 'seq'"):
        TensorSpec("t", ("batch", "seq")).concrete_shape({"batch": 1})


def test_float32_tolerances_are_no_looser_than_the_policy():
    for spec in registry.specs():
        for out in spec.outputs:
            tol = spec.tolerance(out, "float32")
            assert tol.atol <= 1e-5 and tol.rtol <= 1e-4, (spec.name, out, tol)
    assert registry.get("mlp").tolerance("y", "float16") == Tolerance(1e-3, 1e-2)


def _parametrized_over_registry(path: Path) -> bool:
    """True if the module parametrizes a test over ``registry.names()`` (directly or via a
    module-level constant built from it)."""
    return "registry.names()" in path.read_text()


@pytest.mark.parametrize(
    "test_file", ["test_export.py", "test_models.py", "test_runtimes.py"], ids=lambda p: p.removesuffix(".py")
)
def test_all_models_tested(test_file):
    # Adding a model must add its tests: these suites derive their cases from the registry,
    # they do not list models by hand.
    path = TESTS / test_file
    assert _parametrized_over_registry(path), f"{test_file} no longer parametrizes over registry.names()"
    tree = ast.parse(path.read_text())
    hand_lists = [
        n for n in ast.walk(tree)
        if isinstance(n, (ast.List, ast.Tuple)) and len(n.elts) >= 3
        and all(isinstance(e, ast.Constant) and e.value in {"mlp", "cnn", "transformer", "minilm"} for e in n.elts)
    ]
    assert not hand_lists, f"{test_file} lists registry models by hand; derive them from registry.names()"
