"""The README's promises: its test command is what CI runs, and its user-model example works."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    first, second = (b.strip() for b in _bash_blocks()[:2])
    assert README.index(first) < 400, "the set-up commands must open the README"
    assert "python -m exporter export --all" in first
    assert "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines(), ".ci/run must run exactly the README's test command"


def test_user_model_example_registers_and_exports(tmp_path, monkeypatch):
    code = re.search(r"```python\n# my_models.py\n(.*?)```", README, re.S).group(1)
    (tmp_path / "readme_user_models.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import exporter
    from exporter import state
    from exporter.models import registry

    rng = np.random.default_rng(1)
    ckpt = tmp_path / "tiny.safetensors"
    state.save_state({"fc.weight": rng.random((3, 8), np.float32), "fc.bias": rng.random(3, np.float32)}, ckpt)
    try:
        registry.load_plugins("readme_user_models")
        report = exporter.export("tiny", checkpoint=ckpt, out=tmp_path / "out", batch_sizes=(1, 5))
        assert report, report.failures()
        assert {(r.model, r.framework) for r in report.results} == {("tiny", "torch"), ("tiny", "flax")}
    finally:
        registry.unregister("tiny")
        sys.modules.pop("readme_user_models", None)
