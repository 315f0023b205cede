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


def test_unknown_model_list_is_capped():
    extra = [registry.register(_spec(f"cap_{i:02d}")) for i in range(30)]
    try:
        with pytest.raises(UnknownModelError, match=r"known models: (bert, )?cap_00, cap_01, .* \.\.\. and \d+ more\.") as e:
            registry.get("nope")
        shown = str(e.value).split("known models: ", 1)[1].split(" ... ", 1)[0].split(", ")
        assert len(shown) == 20
    finally:
        for spec in extra:
            registry.unregister(spec.name)


def test_a_broken_builtin_propagates(monkeypatch):
    monkeypatch.setattr(registry, "_BUILTINS_LOADED", False)
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", (*registry._BUILTIN_MODULES, "exporter.models.no_such_builtin"))
    with pytest.raises(ModuleNotFoundError, match="exporter.models.no_such_builtin"):
        registry.names()


def test_builtin_modules_are_the_installed_package():
    assert registry._BUILTIN_MODULES == tuple(
        f"exporter.models.{m}" for m in ("mlp", "cnn", "transformer", "bert", "minilm", "gpt2", "resnet")
    )
    assert registry.get("mlp").torch_factory.__module__ == "exporter.models.mlp"


# -- a user-written ModelSpec is checked when it is made ----------------------------------------


def _torch_build():
    raise AssertionError("never built by these tests")


BAD_SPECS = {
    "name-blank": (dict(name="my model"), "name 'my model' must be a non-empty str of letters, digits"),
    "name-empty": (dict(name=""), "name '' must be a non-empty str"),
    "no-inputs": (dict(inputs=()), "inputs must be a non-empty tuple of TensorSpec"),
    "inputs-list": (dict(inputs=[TensorSpec("x", ("batch", 3))]), "inputs must be a non-empty tuple of TensorSpec, got ["),
    "inputs-not-specs": (dict(inputs=(("x", ("batch", 3)),)), "inputs entry 0 is not a TensorSpec: tuple"),
    "no-outputs": (dict(outputs=()), "outputs must be a non-empty tuple of output names"),
    "outputs-str": (dict(outputs="y"), "outputs must be a non-empty tuple of output names, got 'y'"),
    "outputs-empty-name": (dict(outputs=("y", "")), "outputs entry 1 must be a non-empty str, got ''"),
    "duplicate-input": (
        dict(inputs=(TensorSpec("x", ("batch", 3)), TensorSpec("x", ("batch", 3)))),
        "inputs name 'x' is used 2 times",
    ),
    "duplicate-output": (dict(outputs=("y", "y")), "outputs name 'y' is used 2 times"),
    "dims-without-batch": (dict(dims={"seq": 4}), "dims must give a default batch size"),
    "dims-zero": (dict(dims={"batch": 0}), "dims size of 'batch' must be an int >= 1, got 0"),
    "dims-missing-default": (
        dict(inputs=(TensorSpec("x", ("batch", "seq")),)),
        "dims gives no default size for dynamic dim 'seq'",
    ),
    "sweep-unknown-dim": (dict(sweep_dims={"seq": (1, 2)}), "sweep_dims names unknown dim 'seq'; the inputs' dynamic dims are: batch"),
    "sweep-batch": (dict(sweep_dims={"batch": (1, 2)}), "sweep_dims names 'batch'"),
    "sweep-sizes": (
        dict(inputs=(TensorSpec("x", ("batch", "seq")),), dims={"batch": 2, "seq": 4}, sweep_dims={"seq": (0, 2, 1.5)}),
        "sweep_dims size 0 of 'seq' is not an int >= 1",
    ),
    "sweep-empty": (
        dict(inputs=(TensorSpec("x", ("batch", "seq")),), dims={"batch": 2, "seq": 4}, sweep_dims={"seq": ()}),
        "sweep_dims sizes of 'seq' must be a non-empty tuple",
    ),
    "tolerance-tuple": (dict(tolerances={"float32": (1e-5, 1e-4)}), "tolerances['float32'] must be a Tolerance(atol, rtol), got tuple"),
    "tolerance-negative": (dict(tolerances={"float32": Tolerance(-1e-5, 1e-4)}), "tolerances['float32'] atol must be a finite number >= 0, got -1e-05"),
    "tolerance-nan": (dict(output_tolerances={"y": Tolerance(0.0, float("nan"))}), "output_tolerances['y'] rtol must be a finite number >= 0, got nan"),
    "tolerance-dtype": (dict(tolerances={"float": Tolerance(0, 0)}), "tolerances key dtype 'float' is spelled 'float64' by numpy"),
    "output-tolerance-unknown": (dict(output_tolerances={"z": Tolerance(0, 0)}), "output_tolerances names unknown output 'z'; the outputs are: y"),
    "framework-unknown": (dict(frameworks=("torch", "tf"), torch_factory=_torch_build), "frameworks entry 'tf' is unknown; use 'torch' and/or 'flax'"),
    "framework-without-factory": (dict(frameworks=("torch", "flax"), torch_factory=_torch_build), "frameworks lists 'flax' but flax_factory is not given"),
    "framework-twice": (dict(frameworks=("torch", "torch"), torch_factory=_torch_build), "frameworks lists 'torch' twice"),
    "factory-not-callable": (dict(torch_factory="build", frameworks=("torch",)), "torch_factory must be a callable"),
    "ignore-keys-regex": (dict(ignore_keys=("(",)), "ignore_keys pattern '(' is not a valid regular expression"),
    "ignore-keys-str": (dict(ignore_keys=r"^pooler\."), "ignore_keys must be a tuple of regular expressions, got str"),
    "key-rules-regex": (dict(key_rules=(("[a", "b"),)), "key_rules pattern '[a' is not a valid regular expression"),
    "key-rules-pair": (dict(key_rules=(("a", "b", "c"),)), "key_rules entry ('a', 'b', 'c') must be a (regex, replacement) pair of str"),
    "layout-list": (dict(layout=[layouts.Dense("fc", "fc")]), "layout must be a tuple of exporter.layouts.Rule, got list"),
    "layout-not-rules": (dict(layout=(("fc", "fc"),)), "layout entry 0 is not an exporter.layouts.Rule: tuple"),
    "layout-duplicate": (
        dict(layout=(layouts.Dense("fc", "fc"), layouts.Dense("fc", "fc2"))),
        "canonical name 'fc.weight' is owned by two rules",
    ),
    "apply-kwargs": (dict(flax_apply_kwargs={1: True}), "flax_apply_kwargs must be a mapping of keyword name -> value"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_model_spec_is_a_usage_error(case):
    overrides, fragment = BAD_SPECS[case]
    fields = dict(
        name="user_model", summary="test", inputs=(TensorSpec("x", ("batch", 3)),), outputs=("y",),
        layout=(layouts.Dense("fc", "fc"),), frameworks=(),
    )
    fields.update(overrides)
    with pytest.raises(UsageError, match="bad model spec") as info:
        ModelSpec(**fields)
    assert any(fragment in p for p in info.value.problems), info.value.problems
    assert fragment in str(info.value)


def test_bad_model_spec_lists_every_problem():
    with pytest.raises(UsageError) as info:
        ModelSpec(
            name="bad model", summary="test", inputs=(), outputs=("y", "y"), layout=[], dims={},
            ignore_keys=("(",), frameworks=("tf",),
        )
    message = str(info.value)
    assert message.startswith("bad model spec 'bad model'; fix these fields of its ModelSpec(...)")
    assert len(info.value.problems) == 7, info.value.problems
    assert message.count("\n  - ") == 7


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (dict(shape=["batch", 3]), "shape must be a tuple of ints and dim names, got list"),
        (dict(shape=("batch", -1)), "shape entry 1 is -1; expected an int >= 0 (static) or a dim name"),
        (dict(shape=("batch", 2.0)), "shape entry 1 is 2.0"),
        (dict(shape=("batch", True)), "shape entry 1 is True"),
        (dict(shape=("", 3)), "shape entry 0 is ''"),
        (dict(dtype="float"), "dtype 'float' is spelled 'float64' by numpy; write 'float64'"),
        (dict(dtype="f4"), "dtype 'f4' is spelled 'float32' by numpy"),
        (dict(dtype="str"), "dtype 'str' is not numeric"),
        (dict(dtype="tensor"), "dtype 'tensor' is not a numpy dtype"),
        (dict(dtype=np.float32), "dtype must be a numpy dtype name such as 'float32', got type"),
        (dict(name=""), "name must be a non-empty str, got ''"),
        (dict(low=1.0, high=0.0), "low (1.0) must be less than high (0.0)"),
        (dict(high=float("inf")), "high must be a finite number, got inf"),
    ],
)
def test_bad_tensor_spec_is_a_usage_error(overrides, fragment):
    fields = dict(name="x", shape=("batch", 3))
    fields.update(overrides)
    with pytest.raises(UsageError, match="bad input spec") as info:
        TensorSpec(**fields)
    assert fragment in str(info.value)


def test_good_specs_pass():
    for spec in registry.specs():
        assert spec.problems() == [], spec.name
    assert TensorSpec("m", ("batch", "seq"), "bfloat16").dtype == "bfloat16"
    assert TensorSpec("x", (0, "batch"), "bool").shape == (0, "batch")


def test_factory_names_the_builds():
    spec = _spec("only_layout")
    with pytest.raises(UsageError, match=r"model 'only_layout' has no torch build \(it has: none\)"):
        spec.factory("torch")
    with pytest.raises(UsageError, match="unknown framework 'jax'; expected 'torch' or 'flax'"):
        registry.get("mlp").factory("jax")
    assert registry.get("mlp").factory("flax") is registry.get("mlp").flax_factory
