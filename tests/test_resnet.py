"""resnet: the torch build is torchvision's own ResNet (its state-dict names), the flax twin
matches it, configs select the architecture, and both export with dynamic batch and image
size."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import skip_unless_ci
from exporter import rebuild
from exporter.errors import MissingDependencyError, UsageError


def _resnet():
    from exporter.models import resnet

    return resnet


@pytest.fixture(autouse=True)
def _torchvision(request: pytest.FixtureRequest) -> None:
    """torchvision is an optional extra: without it these tests skip (CI installs it)."""
    import importlib.util

    if request.node.name != "test_missing_torchvision_is_a_typed_error" and importlib.util.find_spec("torchvision") is None:
        skip_unless_ci("torchvision is not installed; install with: pip install -c constraints/dev.txt 'exporter[torchvision]'")


def _torchvision_model(arch: str, classes: int = 1000, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = getattr(_resnet().torchvision_resnet(), arch)(weights=None, num_classes=classes).eval()
    with torch.no_grad():  # BatchNorm away from identity, as after training
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return model


def test_torchvision_matches_the_pinned_torch() -> None:
    import torch

    tv = _resnet().torchvision_resnet()
    version = sys.modules["torchvision"].__version__
    assert tv.__name__ == "torchvision.models.resnet"
    assert torch.__version__.startswith("2.13.") and version.startswith("0.28."), (torch.__version__, version)


def test_the_loader_skips_only_an_extension_that_cannot_load() -> None:
    """Where ``import torchvision`` works, it is used as is; where its C extension cannot
    load beside this torch (PyPI's CUDA-built wheel beside the CPU torch), the plain import
    fails and the loader still gives torchvision's own ResNet code."""
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=120)
    code = (
        "import sys\nfrom exporter.models import resnet\nm = resnet.torchvision_resnet()\n"
        "print(m.__file__)\nprint('full' if hasattr(sys.modules['torchvision'], 'set_image_backend') else 'bare')\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    path, kind = loaded.stdout.split()
    assert path.endswith("torchvision/models/resnet.py")
    if plain.returncode == 0:
        assert kind == "full"
    else:
        assert "operator torchvision::nms does not exist" in plain.stderr
        assert kind == "bare"


def test_missing_torchvision_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    resnet = _resnet()
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchvision" else real(n, *a))
    with pytest.raises(MissingDependencyError, match="needs 'torchvision'"):
        resnet.torchvision_resnet()


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_names_are_torchvisions(arch: str) -> None:
    spec = _resnet().FAMILY.spec({"arch": arch, "num_classes": 10})
    model = _torchvision_model(arch, 10)
    theirs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert rebuild.expected_state(spec) == theirs
    assert sorted(theirs) == spec.canonical_names()
    assert "layer2.0.downsample.0.weight" in theirs and theirs["fc.weight"][0][0] == 10
    built = spec.factory("torch")()
    assert type(built).__module__ == "torchvision.models.resnet" and type(built).__name__ == "ResNet"


def test_configs_select_and_are_checked(tmp_path: Path) -> None:
    fam = _resnet().FAMILY
    assert fam.spec() is _resnet().SPEC and _resnet().SPEC.config == {"arch": "resnet18", "num_classes": 1000}
    with pytest.raises(UsageError) as e:
        fam.validate({"arch": "resnet101", "num_classes": 0})
    assert len(e.value.problems) == 2
    assert "this build supports only: \"resnet18\", \"resnet34\", \"resnet50\"" in str(e.value)
    cfg = tmp_path / "r50.json"
    cfg.write_text('{"arch": "resnet50", "num_classes": 5}')
    r = fam.resolve(config=cfg)
    assert r.spec.config["arch"] == "resnet50" and r.spec.tolerance("logits").atol == 1e-3
    assert _resnet().SPEC.tolerance("logits").atol == 1e-5
    assert r.spec.inputs[0].shape == ("batch", 3, "height", "width") and r.spec.outputs == ("logits",)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_torchvision_state_dict_loads_and_the_twin_matches(tmp_path: Path, arch: str) -> None:
    import torch

    from exporter.runtimes.jax import JaxRuntime
    from exporter.runtimes.torch import TorchRuntime
    from exporter.state import load_state

    spec = _resnet().FAMILY.spec({"arch": arch})
    model = _torchvision_model(arch)
    torch.save(model.state_dict(), tmp_path / "resnet.pt")
    state, report = rebuild.prepare_state(spec, load_state(tmp_path / "resnet.pt"), strict=True)
    assert any(k.endswith("num_batches_tracked") for k in report.dropped)
    x = spec.example_inputs({"batch": 2, "height": 45, "width": 64}, seed=1)
    with torch.no_grad():
        theirs = model(torch.from_numpy(x["x"])).numpy()
    ours = TorchRuntime(spec, state).run(x)["logits"]
    assert ours.tobytes() == theirs.tobytes()  # the same module, the same weights
    twin = JaxRuntime(spec, state).run(x)["logits"]
    tol = spec.tolerance("logits")
    np.testing.assert_allclose(twin, theirs, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_exports_with_dynamic_batch_and_image_size(tmp_path: Path, framework: str) -> None:
    from exporter import parity
    from exporter.onnx_export import export_flax, export_torch
    from exporter.runtimes.jax import JaxRuntime
    from exporter.runtimes.onnxruntime import OnnxRuntime
    from exporter.runtimes.torch import TorchRuntime

    spec = _resnet().SPEC
    state = rebuild.init_state(spec, seed=0)
    path = tmp_path / "model.onnx"
    if framework == "torch":
        ex = export_torch(spec, rebuild.torch_module(spec, state), path)
        assert ex.exporter == "torch.onnx.dynamo", ex.fallback_reason
        ref = TorchRuntime(spec, state)
    else:
        export_flax(spec, rebuild.flax_variables(spec, state), path)
        ref = JaxRuntime(spec, state)
    ort = OnnxRuntime(path, intra_op_threads=1)
    assert ort.inputs[0].shape == ("batch", 3, "height", "width")
    failures = []
    for dims in ({"batch": 1, "height": 33, "width": 64}, {"batch": 7, "height": 64, "width": 64}, {"batch": 2, "height": 57, "width": 31}, {"batch": 1, "height": 224, "width": 224}):
        x = spec.example_inputs(dims, seed=2)
        failures += [c.line() for c in parity.compare(ref.run(x), ort.run(x), spec.tolerance, case=parity.case_label(dims)) if not c.ok]
    assert not failures, "\n".join(failures)
