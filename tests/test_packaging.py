"""Packaging: ``models/`` and ``runtimes/`` install as ``exporter.models`` / ``exporter.runtimes``.

A user's own top-level ``models`` or ``runtimes`` package (common names in ML repositories)
neither shadows ours nor is shadowed by it; user registries still register through
``exporter.models.registry``; the wheel holds exactly the ``exporter`` tree, with the
Node program's files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILTINS = {"mlp", "cnn", "transformer", "minilm"}
JS_FILES = {"run_bundle.js", "tensorproto.js", "package.json", "package-lock.json", "browser/index.html", "browser/runner.js", "browser/driver.js"}

# Run in a fresh interpreter whose path starts with foreign `models` and `runtimes` packages.
SHADOW_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import models, runtimes
    from models import registry as foreign_models
    from runtimes import registry as foreign_runtimes

    import exporter
    from exporter.models import registry
    from exporter.runtimes.base import load_runtime

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), "tiny.onnx")
    outputs = {}
    for name in ("onnxruntime", "reference"):
        with load_runtime(name, "tiny.onnx") as rt:
            outputs[name] = rt.run({"x": np.zeros((3, 2), np.float32)})["y"].tolist()
    print(json.dumps({
        "foreign": [foreign_models.WHO, foreign_runtimes.WHO],
        "foreign_files": [models.__file__, runtimes.__file__],
        "exporter_file": exporter.__file__,
        "ours": [registry.__file__, sys.modules["exporter.runtimes.base"].__file__],
        "names": registry.names(),
        "outputs": outputs,
    }))
    """
)

USER_REGISTRY = textwrap.dedent(
    """
    from exporter.layouts import Dense
    from exporter.models.registry import ModelSpec, TensorSpec, register

    register(ModelSpec(
        name="user_tiny", summary="registered by a user module",
        inputs=(TensorSpec("x", ("batch", 4)),), outputs=("y",), layout=(Dense("fc", "fc"),),
    ))
    """
)


def _foreign_packages(root: Path) -> Path:
    """``root/models`` and ``root/runtimes``: packages with a ``registry`` module of their own."""
    for name in ("models", "runtimes"):
        pkg = root / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f'"""A user\'s own {name} package."""\n')
        (pkg / "registry.py").write_text(f'WHO = "foreign {name}"\n')
    return root


def _env(*path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXPORTER_REGISTRY")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    return env


def _shadow_check(tmp_path: Path, *path: Path) -> dict:
    work = tmp_path / "work"  # cwd is on sys.path for `python -c`: keep the repo out of it
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", SHADOW_CHECK], cwd=work, env=_env(*path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["foreign"] == ["foreign models", "foreign runtimes"]
    assert all(Path(f).is_relative_to(path[0]) for f in result["foreign_files"])
    assert BUILTINS <= set(result["names"])
    assert result["outputs"] == {"onnxruntime": [[1.0, 2.0]] * 3, "reference": [[1.0, 2.0]] * 3}
    return result


def test_foreign_models_and_runtimes_packages_do_not_collide(tmp_path: Path) -> None:
    foreign = _foreign_packages(tmp_path / "foreign")
    result = _shadow_check(tmp_path, foreign)
    assert Path(result["ours"][0]) == REPO / "models" / "registry.py"  # the editable install maps the repo dirs
    assert Path(result["ours"][1]) == REPO / "runtimes" / "base.py"


def test_user_registry_module_through_the_cli(tmp_path: Path) -> None:
    foreign = _foreign_packages(tmp_path / "foreign")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_user_models.py").write_text(USER_REGISTRY)
    work = tmp_path / "work"
    work.mkdir()
    runs = {
        "--registry": ([sys.executable, "-m", "exporter", "--registry", "my_user_models", "list", "--json"], {}),
        "EXPORTER_REGISTRY": ([sys.executable, "-m", "exporter", "list", "--json"], {"EXPORTER_REGISTRY": "my_user_models"}),
    }
    for how, (cmd, extra) in runs.items():
        proc = subprocess.run(
            cmd, cwd=work, env={**_env(foreign, plugins), **extra}, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (how, proc.stderr)
        listed = {m["name"]: m for m in json.loads(proc.stdout)}
        assert BUILTINS | {"user_tiny"} <= set(listed), how
        assert listed["user_tiny"]["summary"] == "registered by a user module"
        assert listed["user_tiny"]["frameworks"] == []  # no factories given: no builds


def _source_copy(dst: Path) -> Path:
    """The files the build reads, copied: building in the repo would write build/ and egg-info there."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    skip = shutil.ignore_patterns("node_modules", "__pycache__", "*.pyc", "*.egg-info")
    for name in ("exporter", "models", "runtimes"):
        shutil.copytree(REPO / name, dst / name, ignore=skip)
    return dst


def test_wheel_installs_everything_under_exporter(tmp_path: Path) -> None:
    src = _source_copy(tmp_path / "src")
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("exporter-*.whl")
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        top_level = z.read(next(f for f in files if f.endswith(".dist-info/top_level.txt"))).decode().split()
    assert top_level == ["exporter"]
    tops = {f.split("/", 1)[0] for f in files} - {"exporter"}
    assert len(tops) == 1 and tops.pop().endswith(".dist-info")  # no top-level models/ or runtimes/
    for pkg, repo_dir in (("models", "models"), ("runtimes", "runtimes")):
        want = {f"exporter/{pkg}/{p.name}" for p in (REPO / repo_dir).glob("*.py")}
        got = {f for f in files if f.startswith(f"exporter/{pkg}/") and f.count("/") == 2 and f.endswith(".py")}
        assert got == want, pkg
    ours = {f"exporter/{p.relative_to(REPO / 'exporter').as_posix()}" for p in (REPO / "exporter").rglob("*.py")}
    assert ours <= files, sorted(ours - files)  # every subpackage of exporter/ (formats, variants, ...) ships
    assert {f for f in files if f.startswith("exporter/runtimes/js/")} == {f"exporter/runtimes/js/{n}" for n in JS_FILES}
    assert not any("node_modules" in f for f in files)
    assert "exporter/py.typed" in files

    # Installed from the wheel (not the editable checkout), ours still wins over foreign packages.
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _shadow_check(tmp_path, _foreign_packages(tmp_path / "foreign"), target)
    assert Path(result["exporter_file"]).is_relative_to(target)
    assert Path(result["ours"][0]) == target / "exporter" / "models" / "registry.py"
    assert Path(result["ours"][1]) == target / "exporter" / "runtimes" / "base.py"
