"""Config-driven families: configs are validated field by field (every problem in one typed
error), found beside a checkpoint or given explicitly, recorded with their sha256; the
bert family's all-MiniLM-L6-v2 config is minilm, bit for bit; a BERT checkpoint written
by ``transformers`` exports and matches transformers' own outputs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import _decoder
from conftest import skip_unless_ci
from exporter import rebuild
from exporter.errors import MissingDependencyError, StateMismatchError, UnknownModelError, UsageError
from exporter.models import family, registry
from exporter.state import load_state

HF_BERT = {"vocab_size": 500, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64}


def _gpt2():
    from exporter.models import gpt2

    return gpt2.FAMILY


def _bert():
    from exporter.models import bert

    return bert.FAMILY


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def test_every_bad_field_is_listed_at_once() -> None:
    bad = {
        "n_embd": "64",
        "n_head": 0,
        "n_inner": 2.5,
        "activation_function": "swish",
        "layer_norm_epsilon": 0,
        "tie_word_embeddings": False,
        "scale_attn_weights": 1,
        "model_type": "llama",
        "dropout": 0.1,  # unknown keys are not problems
    }
    with pytest.raises(UsageError) as e:
        _gpt2().validate(bad, "my.json")
    p = e.value.problems
    assert len(p) == 11, p
    text = str(e.value)
    assert "config 'my.json' does not describe a valid 'gpt2' model (11 problem(s))" in text
    for fragment in (
        "missing field 'vocab_size'",
        "missing field 'n_positions'",
        "missing field 'n_layer'",
        "field 'n_embd' is \"64\" (str); expected an int >= 1",
        "field 'n_head' is 0; expected >= 1",
        "field 'n_inner' is 2.5 (float); expected an int >= 1 or null",
        "field 'activation_function' is \"swish\"; this build supports only: \"gelu_new\", \"gelu_pytorch_tanh\", \"gelu\", \"relu\"",
        "field 'layer_norm_epsilon' is 0; expected > 0",
        "field 'tie_word_embeddings' is false; this build supports only: true",
        "field 'scale_attn_weights' is 1 (int); expected one of true",
        "field 'model_type' is \"llama\"; this build supports only: \"gpt2\"",
    ):
        assert any(fragment in line for line in p), (fragment, p)


def test_cross_field_checks_and_defaults() -> None:
    ok = {"vocab_size": 10, "n_positions": 8, "n_embd": 12, "n_layer": 1, "n_head": 4}
    values, ignored = _gpt2().validate({**ok, "summary_type": "cls_index", "n_inner": None})
    assert values["n_inner"] is None and values["activation_function"] == "gelu_new" and values["layer_norm_epsilon"] == 1e-5
    assert ignored == ("summary_type",)
    assert list(values) == [f.name for f in _gpt2().fields]
    with pytest.raises(UsageError, match="'n_embd' \\(12\\) is not divisible by 'n_head' \\(5\\)"):
        _gpt2().validate({**ok, "n_head": 5})
    with pytest.raises(UsageError, match="not divisible by 'num_attention_heads'"):
        _bert().validate({**HF_BERT, "num_attention_heads": 5})
    with pytest.raises(UsageError, match="'pad_token_id' \\(600\\) is not a token id"):
        _bert().validate({**HF_BERT, "pad_token_id": 600})
    with pytest.raises(UsageError, match="must be a mapping"):
        _gpt2().validate([1, 2])  # type: ignore[arg-type]
    assert _gpt2().validate({**ok, "layer_norm_epsilon": 1})[0]["layer_norm_epsilon"] == 1.0  # an int is a number


def test_config_files(tmp_path: Path) -> None:
    fam = _gpt2()
    with pytest.raises(UsageError, match="does not exist"):
        fam.resolve(config=tmp_path / "nope.json")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="is a directory; pass a JSON file \\(did you mean"):
        fam.resolve(config=tmp_path / "ckpt")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UsageError, match="is not valid JSON"):
        fam.resolve(config=bad)
    bad.write_text("[1]")
    with pytest.raises(UsageError, match="holds a JSON list; expected an object"):
        fam.resolve(config=bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="not valid JSON"):
        fam.resolve(config=bad)
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20) + "{}")
    with pytest.raises(UsageError, match="a model config is a small JSON object"):
        fam.resolve(config=big)
    with pytest.raises(UsageError, match="missing field 'vocab_size'"):  # config.json beside the checkpoint is read
        fam.resolve(checkpoint=tmp_path / "ckpt")


def test_resolve_order_and_record(tmp_path: Path) -> None:
    fam = _gpt2()
    small = {"vocab_size": 50, "n_positions": 16, "n_embd": 8, "n_layer": 1, "n_head": 2, "use_cache": True}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    raw = json.dumps(small, indent=1).encode()
    (ckpt / "config.json").write_bytes(raw)
    (ckpt / "model.safetensors").write_bytes(b"")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**small, "n_layer": 3}))

    beside = fam.resolve(checkpoint=ckpt / "model.safetensors")  # a file: its directory's config.json
    assert beside.source == str(ckpt / "config.json") and beside.values["n_layer"] == 1
    assert beside.sha256 == hashlib.sha256(raw).hexdigest() and beside.ignored == ("use_cache",)
    assert fam.resolve(checkpoint=ckpt).spec is beside.spec  # one spec object per config
    explicit = fam.resolve(checkpoint=ckpt, config=other)  # --config wins
    assert explicit.values["n_layer"] == 3 and explicit.spec is not beside.spec
    assert len(explicit.spec.inputs) == 2 + 2 * 3
    default = fam.resolve()
    assert default.source is None and default.spec is registry.get("gpt2")
    rec = beside.record()
    assert rec == {"family": "gpt2", "source": str(ckpt / "config.json"), "sha256": beside.sha256,
                   "values": dict(beside.values), "ignored_keys": ["use_cache"]}
    assert default.record()["source"] == "default" and len(default.record()["sha256"]) == 64
    json.dumps(rec, allow_nan=False)
    assert fam.resolve(checkpoint=tmp_path / "nowhere").source is None  # no config.json: the default
    mapping = fam.resolve(config={**small, "n_layer": 2})
    assert mapping.source == family.MAPPING_SOURCE and mapping.record()["source"] == "<mapping>" and mapping.values["n_layer"] == 2


def test_families_in_the_registry() -> None:
    _gpt2(), _bert()
    names = registry.names()
    assert {"bert", "gpt2"} <= set(names)
    fams = {f.name: f for f in family.families()}
    assert {"bert", "gpt2"} <= set(fams)
    assert family.is_family("gpt2") and not family.is_family("mlp")
    assert family.get_family("bert") is _bert()
    with pytest.raises(UnknownModelError, match="'mlp' is not a model family; families"):
        family.get_family("mlp")
    d = _gpt2().to_dict()
    assert d["name"] == "gpt2" and d["default"]["n_embd"] == 64
    fields = {f["name"]: f for f in d["fields"]}
    assert fields["n_layer"]["required"] and not fields["activation_function"]["required"]
    assert fields["activation_function"]["default"] == "gelu_new"
    json.dumps(d, allow_nan=False)
    spec = registry.get("bert")
    assert isinstance(spec, family.FamilySpec) and spec.family == "bert" and spec.config["hidden_size"] == 128


def test_a_second_family_of_the_same_name_is_refused() -> None:
    dup = family.Family("gpt2", "x", _gpt2().fields, _gpt2().make_spec)
    with pytest.raises(UsageError, match="already registered"):
        family.register_family(dup)


# ---------------------------------------------------------------------------------------
# bert
# ---------------------------------------------------------------------------------------
def test_minilm_is_the_all_minilm_config_of_bert() -> None:
    """minilm is the bert family at all-MiniLM-L6-v2's config (its behaviour, tested in
    test_minilm.py on the real weights, is the bert build's)."""
    from exporter.models import bert, minilm

    m = minilm.SPEC
    assert m is registry.get("minilm") is bert.FAMILY.named("minilm", bert.MINILM_CONFIG, summary=m.summary)
    assert isinstance(m, bert.BertSpec) and m.family == "bert"
    assert {k: m.config[k] for k in bert.MINILM_CONFIG} == dict(bert.MINILM_CONFIG)
    assert family.config_record(m)["source"] == "builtin" and family.config_record(registry.get("bert"))["source"] == "default"
    assert family.config_record(registry.get("mlp")) is None
    expected = rebuild.expected_state(m)
    assert expected["encoder.layer.5.intermediate.dense.weight"] == ((1536, 384), "float32")
    assert expected["embeddings.word_embeddings.weight"] == ((30522, 384), "float32") and len(expected) == 101
    assert m.sweep_dims == {"seq": (1, 16, 64)} and m.dims == {"batch": 2, "seq": 16}


def test_the_real_minilm_directory_resolves_to_the_minilm_config() -> None:
    from exporter.models import bert, minilm

    try:
        d = minilm.package_dir()
    except MissingDependencyError as e:
        skip_unless_ci(str(e))
    r = bert.FAMILY.resolve(checkpoint=d / "model.safetensors")
    assert r.source == str(d / "config.json")
    assert {k: r.values[k] for k in bert.MINILM_CONFIG} == dict(bert.MINILM_CONFIG)
    assert "architectures" in r.ignored
    state, report = rebuild.prepare_state(r.spec, load_state(d / "model.safetensors"), strict=True)
    assert sorted(state) == sorted(rebuild.expected_state(r.spec)) and "embeddings.position_ids" in report.dropped


def _hf_bert(tmp_path: Path, cls: str = "BertModel"):
    import torch

    transformers = _decoder.transformers()
    torch.manual_seed(0)
    model = getattr(transformers, cls)(transformers.BertConfig(**HF_BERT)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / cls)
    return model, tmp_path / cls


def _hf_outputs(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       token_type_ids=torch.zeros_like(torch.from_numpy(ids))).last_hidden_state.numpy()
    m = mask[:, :, None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), hidden


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_transformers_bert_checkpoint_matches_transformers(tmp_path: Path, framework: str) -> None:
    from exporter.runtimes.jax import JaxRuntime
    from exporter.runtimes.torch import TorchRuntime

    model, d = _hf_bert(tmp_path)
    r = _bert().resolve(checkpoint=d)
    assert r.values["hidden_size"] == 32 and r.spec.name == "bert"
    state, report = rebuild.prepare_state(r.spec, load_state(d / "model.safetensors"), strict=True, source=str(d))
    assert any(k.startswith("pooler.") for k in report.dropped)
    rt = (TorchRuntime if framework == "torch" else JaxRuntime)(r.spec, state)
    x = r.spec.example_inputs({"batch": 4, "seq": 11}, seed=2)
    assert (x["attention_mask"] == 0).any()
    ours = rt.run(x)
    emb, hidden = _hf_outputs(model, x["input_ids"], x["attention_mask"])
    real = x["attention_mask"] == 1
    np.testing.assert_allclose(ours["last_hidden_state"][real], hidden[real], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ours["sentence_embedding"], emb, atol=1e-5, rtol=1e-4)


def test_task_model_checkpoints_load_through_the_bert_prefix(tmp_path: Path) -> None:
    _model, d = _hf_bert(tmp_path, "BertForMaskedLM")
    spec = _bert().resolve(checkpoint=d).spec
    raw = load_state(d / "model.safetensors")
    assert any(k.startswith("bert.encoder.") for k in raw)
    with pytest.raises(StateMismatchError, match="unexpected key 'cls.predictions"):
        rebuild.prepare_state(spec, raw, strict=True)
    heads = [k for k in raw if k.startswith("cls.")]
    state, _ = rebuild.prepare_state(spec, {k: v for k, v in raw.items() if k not in heads}, strict=True)
    assert "encoder.layer.1.output.dense.weight" in state


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_transformers_bert_checkpoint_exports_and_matches_transformers(tmp_path: Path, framework: str) -> None:
    """The exported ONNX (onnxruntime) gives transformers' own outputs."""
    from exporter.onnx_export import export_flax, export_torch
    from exporter.runtimes.onnxruntime import OnnxRuntime

    model, d = _hf_bert(tmp_path)
    spec = _bert().resolve(checkpoint=d).spec
    state, _ = rebuild.prepare_state(spec, load_state(d / "model.safetensors"), strict=True)
    path = tmp_path / framework / "model.onnx"
    if framework == "torch":
        assert export_torch(spec, rebuild.torch_module(spec, state), path).exporter == "torch.onnx.dynamo"
    else:
        export_flax(spec, rebuild.flax_variables(spec, state), path)
    ort = OnnxRuntime(path, intra_op_threads=1)
    for batch, seq in ((1, 1), (2, 16), (7, 64)):
        x = spec.example_inputs({"batch": batch, "seq": seq}, seed=batch)
        ours = ort.run(x)
        emb, hidden = _hf_outputs(model, x["input_ids"], x["attention_mask"])
        real = x["attention_mask"] == 1
        np.testing.assert_allclose(ours["last_hidden_state"][real], hidden[real], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(ours["sentence_embedding"], emb, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def test_list_shows_families_and_their_fields(capsys) -> None:
    from exporter.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "families (sized by config.json beside --checkpoint, or --config FILE; * = required field):" in out
    assert "  gpt2: vocab_size*, n_positions*, n_embd*, n_layer*, n_head*, n_inner=null, activation_function=\"gelu_new\"" in out
    assert '  resnet: arch="resnet18", num_classes=1000' in out
    assert "past_key_values.<i>.key: float32[batch, 4, past, 16] (i=0..1)" in out
    assert main(["list", "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert models["gpt2"]["family"] == "gpt2" and models["gpt2"]["config"]["n_layer"] == 2
    assert [f["name"] for f in models["resnet"]["config_fields"]] == ["arch", "num_classes"]
    assert models["minilm"]["family"] == "bert" and models["minilm"]["config_fields"] == []
    assert models["mlp"]["family"] is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["export", "mlp", "--config", "{c}"], "--config sizes a model family (bert, gpt2, resnet); model 'mlp' is not one"),
        (["export", "gpt2", "bert", "--config", "{c}"], "--config sizes one model family; export one model with it"),
        (["export", "gpt2", "--config", "{bad}"], "missing field 'n_embd'"),
        (["export", "resnet", "--config", "{nope}"], "does not exist"),
    ],
)
def test_bad_configs_exit_2_before_any_work(capsys, tmp_path: Path, argv: list[str], fragment: str) -> None:
    from exporter.cli import main

    (tmp_path / "c.json").write_text('{"arch": "resnet34"}')
    (tmp_path / "bad.json").write_text('{"vocab_size": 10, "n_positions": 8, "n_layer": 1, "n_head": "2"}')
    files = {"c": tmp_path / "c.json", "bad": tmp_path / "bad.json", "nope": tmp_path / "nope.json"}
    code = main([a.format(**files) for a in argv] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "UsageError" in err and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_resnet_with_a_config_file(capsys, tmp_path: Path) -> None:
    """``export resnet --config FILE``: the file's architecture, recorded with its sha256."""
    import importlib.util

    from exporter.cli import main

    if importlib.util.find_spec("torchvision") is None:
        skip_unless_ci("torchvision is not installed; install with: pip install 'exporter[torchvision]'")
    cfg = tmp_path / "resnet34.json"
    cfg.write_text('{"arch": "resnet34", "num_classes": 10}\n')
    code = main(["export", "resnet", "--config", str(cfg), "--framework", "torch", "--batch-sizes", "1,3", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    manifest = json.loads((tmp_path / "out" / "resnet" / "torch" / "manifest.json").read_text())
    assert manifest["config"] == {"family": "resnet", "source": str(cfg), "sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
                                  "values": {"arch": "resnet34", "num_classes": 10}, "ignored_keys": []}
    assert manifest["outputs"][0]["name"] == "logits" and manifest["tolerances"]["per_output"]["logits"]["atol"] == 1e-3
    assert "torchvision resnet34" in manifest["summary"]


@pytest.mark.slow
def test_export_gpt2_from_a_transformers_checkpoint_directory(capsys, tmp_path: Path) -> None:
    """``export gpt2 --checkpoint DIR`` with the directory ``save_pretrained`` wrote: its
    config.json sizes the model, its model.safetensors loads strictly, generation parity passes."""
    from exporter.cli import main

    ckpt = _decoder.hf_checkpoint(tmp_path, "other")
    code = main(["export", "gpt2", "--checkpoint", str(ckpt), "--framework", "torch", "--batch-sizes", "1,2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    bundle = tmp_path / "out" / "gpt2" / "torch"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["config"]["source"] == str(ckpt / "config.json") and manifest["config"]["values"]["n_layer"] == 3
    assert manifest["checkpoint"]["format"] in ("safetensors", "hf-sharded") and manifest["generation"]["summary"]["ok"]
    assert len([i for i in manifest["inputs"] if i["name"].startswith("past_key_values.")]) == 6
    assert main(["verify", str(bundle)]) == 0


def test_a_transformers_directory_is_its_weights_file(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    assert family.hf_weights(d) is None  # no config.json
    (d / "config.json").write_text("{}")
    assert family.hf_weights(d) is None  # no weights
    (d / "pytorch_model.bin").write_bytes(b"x")
    assert family.hf_weights(d) == d / "pytorch_model.bin"
    (d / "model.safetensors").write_bytes(b"x")
    assert family.hf_weights(d) == d / "model.safetensors"
    assert family.hf_weights(d / "model.safetensors") is None  # a file is a file
    (d / "model.safetensors.index.json").write_text("{}")
    assert family.hf_weights(d) is None  # sharded: the state reader takes the directory itself
