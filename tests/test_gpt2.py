"""gpt2: checkpoints written by Hugging Face ``transformers`` load strictly and give
transformers' own outputs, in torch and in flax; the KV-cache export runs at past length 0
(the prefill) and longer in onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import _decoder
from exporter import generation, rebuild
from exporter.errors import StateMismatchError, UsageError
from exporter.state import load_state


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpt2")


def _family():
    from exporter.models import gpt2

    return gpt2.FAMILY


def _position_ids(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos)


def test_registered_default_is_the_small_config() -> None:
    from exporter.models import gpt2, registry

    spec = registry.get("gpt2")
    assert spec is gpt2.SPEC is gpt2.FAMILY.spec()
    assert [t.name for t in spec.inputs] == gpt2.input_names(2)
    assert list(spec.outputs) == gpt2.output_names(2)
    assert spec.inputs[1].shape == ("batch", "past + seq")
    assert spec.inputs[2].shape == ("batch", 4, "past", 16)
    assert spec.dynamic_dims() == ["batch", "seq", "past"]


def test_state_dict_names_are_hugging_faces() -> None:
    tf = _decoder.transformers()
    for which, cfg in _decoder.HF_CONFIGS.items():
        spec = _family().spec(cfg)
        hf = tf.GPT2LMHeadModel(tf.GPT2Config(**cfg))
        theirs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in hf.state_dict().items()}
        assert "lm_head.weight" in theirs and hf.lm_head.weight is hf.transformer.wte.weight  # tied in HF too
        del theirs["lm_head.weight"]
        assert rebuild.expected_state(spec) == theirs, which
        # Conv1D: (in, out), the transpose of nn.Linear
        assert theirs["transformer.h.0.attn.c_attn.weight"][0] == (cfg["n_embd"], 3 * cfg["n_embd"])


@pytest.mark.parametrize("framework", ["torch", "flax"])
@pytest.mark.parametrize("which", sorted(_decoder.HF_CONFIGS))
def test_transformers_checkpoint_matches_transformers(root: Path, which: str, framework: str) -> None:
    import torch

    ckpt = _decoder.hf_checkpoint(root, which)
    resolved = _family().resolve(checkpoint=ckpt)
    assert resolved.source == str(ckpt / "config.json")
    assert resolved.values["n_layer"] == _decoder.HF_CONFIGS[which]["n_layer"]
    spec = resolved.spec
    raw = load_state(ckpt / "model.safetensors")
    assert "lm_head.weight" not in raw  # save_pretrained drops the tied head
    state, report = rebuild.prepare_state(spec, raw, strict=True, source=str(ckpt))
    assert report.ok and not report.unexpected
    rt = _decoder.reference(spec, state, framework)
    cfg = _decoder.HF_CONFIGS[which]
    heads, d = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg["vocab_size"], size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0  # one real token
    feed = {"input_ids": ids, "attention_mask": mask}
    feed |= {n: np.zeros((3, heads, 0, d), np.float32) for n in [t.name for t in spec.inputs][2:]}
    ours = rt.run(feed)
    hf = _decoder.hf_model(ckpt)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(_position_ids(mask)), use_cache=True)
    real = mask == 1
    tol = spec.tolerance("logits")
    np.testing.assert_allclose(ours["logits"][real], out.logits.numpy()[real], atol=tol.atol, rtol=tol.rtol)
    for i in range(cfg["n_layer"]):
        layer = out.past_key_values.layers[i]
        for kv, theirs in (("key", layer.keys), ("value", layer.values)):
            mine = ours[f"present.{i}.{kv}"].transpose(0, 2, 1, 3)[real]
            np.testing.assert_allclose(mine, theirs.numpy().transpose(0, 2, 1, 3)[real], atol=tol.atol, rtol=tol.rtol)


def test_greedy_generation_matches_transformers_generate(root: Path) -> None:
    """Left-padded batched greedy decoding: our KV-cache loop on the torch build gives the
    token ids of ``transformers``' own ``generate``."""
    import torch

    ckpt = _decoder.hf_checkpoint(root, "default")
    resolved = _family().resolve(checkpoint=ckpt)
    state, _ = rebuild.prepare_state(resolved.spec, load_state(ckpt / "model.safetensors"))
    ours_rt = _decoder.reference(resolved.spec, state, "torch")
    prompts = generation.make_prompts(1000, [11, 4, 7], new_tokens=32, seed=3)
    ours = generation.greedy(ours_rt, prompts)
    hf = _decoder.hf_model(ckpt)
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(prompts.input_ids),
            attention_mask=torch.from_numpy(prompts.attention_mask),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
        )
    theirs = out[:, prompts.input_ids.shape[1]:].numpy()
    np.testing.assert_array_equal(ours.tokens, theirs)


def test_gpt2model_checkpoint_with_buffers_loads(root: Path) -> None:
    """The original GPT-2 upload's keys: no ``transformer.`` prefix, ``attn.bias`` /
    ``attn.masked_bias`` buffers, a stored (tied) ``lm_head.weight``."""
    ckpt = _decoder.hf_checkpoint(root, "default")
    spec = _family().resolve(checkpoint=ckpt).spec
    raw = load_state(ckpt / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in raw.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = np.tril(np.ones((128, 128), np.float32))[None, None]
        old[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    old["lm_head.weight"] = raw["transformer.wte.weight"]
    state, report = rebuild.prepare_state(spec, old, strict=True)
    assert sorted(state) == sorted(raw)
    assert all(state[k].tobytes() == raw[k].tobytes() for k in raw)
    assert "lm_head.weight" in report.dropped and "h.0.attn.masked_bias" in report.dropped


def test_checkpoint_of_another_size_is_refused(root: Path) -> None:
    ckpt = _decoder.hf_checkpoint(root, "other")
    default = _family().spec()
    with pytest.raises(StateMismatchError, match="mismatched transformer.h.0.attn.c_attn.weight"):
        rebuild.prepare_state(default, load_state(ckpt / "model.safetensors"), strict=True)


def test_example_inputs_are_left_padded_and_checked() -> None:
    spec = _family().spec()
    x = spec.example_inputs({"batch": 7, "seq": 3, "past": 5}, seed=4)
    assert x["input_ids"].shape == (7, 3) and x["attention_mask"].shape == (7, 8)
    assert x["past_key_values.1.value"].shape == (7, 4, 5, 16)
    mask = x["attention_mask"]
    assert mask[0].all() and mask[:, -1].all()
    assert (np.diff(mask, axis=1) >= 0).all()  # zeros only on the left
    assert x["input_ids"].tobytes() == spec.example_inputs({"batch": 7, "seq": 3, "past": 5}, seed=4)["input_ids"].tobytes()
    empty = spec.example_inputs({"batch": 1, "seq": 1, "past": 0})
    assert empty["past_key_values.0.key"].shape == (1, 4, 0, 16)
    with pytest.raises(UsageError, match="over n_positions = 128"):
        spec.example_inputs({"batch": 1, "seq": 100, "past": 29})


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_kv_cache_export_runs_prefill_and_decode(root: Path, framework: str) -> None:
    """One graph: past length 0 (prefill, empty past tensors), 1 and longer, seq 1 (decode)
    and 7, batch 1..64, against the framework within the float32 defaults."""
    from exporter import parity
    from exporter.runtimes.onnxruntime import OnnxRuntime

    spec, state, path = _decoder.export(root, framework)
    ref = _decoder.reference(spec, state, framework)
    ort = OnnxRuntime(path, intra_op_threads=1)
    shapes = {i.name: i.shape for i in ort.inputs}
    assert shapes["input_ids"] == ("batch", "seq")
    assert shapes["past_key_values.0.key"] == ("batch", 4, "past", 16)
    assert shapes["attention_mask"][0] == "batch" and set(shapes["attention_mask"][1].replace(" ", "").split("+")) == {"past", "seq"}
    failures = []
    for batch in (1, 2, 7, 64):
        for seq in (1, 7):
            for past in (0, 1, 5, 17):
                dims = {"batch": batch, "seq": seq, "past": past}
                x = spec.example_inputs(dims, seed=5)
                checks = parity.compare(ref.run(x), ort.run(x), spec.tolerance, case=parity.case_label(dims), dims=dims)
                failures += [c.line() for c in checks if not c.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_transformers_checkpoint_exports_and_generates_transformers_tokens(root: Path, framework: str) -> None:
    """A checkpoint of another size, written by transformers: the ONNX export's logits are
    transformers' (real positions of a left-padded batch), and greedy decoding through the
    KV cache in onnxruntime gives the token ids of transformers' ``generate``."""
    import torch

    from exporter.runtimes.onnxruntime import OnnxRuntime

    spec, _state, path = _decoder.export(root, framework, "other")
    ort = OnnxRuntime(path, intra_op_threads=1)
    hf = _decoder.hf_model(_decoder.hf_checkpoint(root, "other"))
    prompts = generation.make_prompts(777, [9, 2, 5, 9], new_tokens=32, seed=7)
    feed = {"input_ids": prompts.input_ids, "attention_mask": prompts.attention_mask}
    feed |= generation.DecoderIO.of(ort).empty_past(prompts.batch)
    ours = ort.run(feed)["logits"]
    ids, mask = (torch.from_numpy(a) for a in (prompts.input_ids, prompts.attention_mask))
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=torch.from_numpy(_position_ids(prompts.attention_mask))).logits.numpy()
        hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
        hf.generation_config.pad_token_id = 0
        tokens = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    real = prompts.attention_mask == 1
    tol = spec.tolerance("logits")
    np.testing.assert_allclose(ours[real], theirs[real], atol=tol.atol, rtol=tol.rtol)
    np.testing.assert_array_equal(generation.greedy(ort, prompts).tokens, tokens[:, prompts.input_ids.shape[1]:].numpy())
