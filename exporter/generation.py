"""Generation parity: greedy decoding through the KV cache must give the same tokens.

A decoder export is checked one forward step at a time by the parity sweep; that does not
show that *generation* works: the cache written by one step has to be read back correctly
by the next, over dozens of steps, with left-padded batches.  This module runs the loop
users run, on any :class:`exporter.runtimes.base.Runtime` (the torch or jax build, or an
ONNX file in onnxruntime, the reference evaluator or Node), and compares two runs:

* **tokens**: greedy decoding (argmax of the last position's logits, first index on ties)
  of ``new_tokens`` tokens from seeded prompts must give exactly the reference's token ids;
* **logits**: at every step the candidate's logits must be within tolerance of the
  reference's (``|c - r| <= atol + rtol * |r|``, the model's ``logits`` tolerance);
* **ambiguous steps**: where the reference's top-2 margin is under twice the tolerance at
  its top logit, two logits that are each within tolerance may swap order, so a different
  token there is a tie, not an error.  Such a step is reported, its logits are compared,
  and that row is compared up to it (its later tokens legitimately differ);
* the first divergent step of a row is reported with both tokens and the logits each
  side gave both of them.

The decoder contract is Optimum's / onnxruntime-genai's naming: inputs ``input_ids``
``[batch, seq]``, ``attention_mask`` ``[batch, past + seq]`` and
``past_key_values.<i>.key``/``.value`` ``[batch, heads, past, head_dim]``; outputs
``logits`` ``[batch, seq, vocab]`` and ``present.<i>.key``/``.value``.  The prefill runs
with empty past tensors (past length 0) over the whole left-padded prompt; each later
step feeds the one new token, the mask grown by one, and the previous step's presents.
Every run generates exactly ``new_tokens`` tokens (no end-of-sequence stop), so every
step is compared.

Test data (so that ``verify`` replays the loop without torch or jax)::

    generation_set_<k>/
      prompt_0.pb     input_ids       int64 [batch, prompt_len]   left-padded prompts
      prompt_1.pb     attention_mask  int64 [batch, prompt_len]
      expected_0.pb   tokens          int64 [batch, new_tokens]   the reference's tokens
      expected_1.pb   logits          float32 [batch, new_tokens, K]   its last-position logits
      expected_2.pb   logit_ids       int64 [batch, new_tokens, K]     (only when K < vocab)

The logits are stored for the whole vocabulary when that takes at most
:data:`FULL_LOGITS_BYTES`, else for the reference's top :data:`TOP_K` tokens of each step
(then the candidate's logits are compared at those token ids, its argmax still over the
whole vocabulary).  The directories are not named ``test_data_set_*``: tools that run
ONNX model-zoo test data (onnxruntime's ``onnx_test_runner``) would take them for
single-step cases of the model's full signature.  Their description (case label, batch,
prompt lengths, tolerance) is :meth:`GenerationSet.to_dict`, kept in the bundle manifest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import BundleError, RunError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import Tolerance
    from exporter.parity import OutputCheck
    from exporter.runtimes.base import IOSpec, Runtime

__all__ = [
    "DEFAULT_NEW_TOKENS",
    "DEFAULT_BATCHES",
    "FULL_LOGITS_BYTES",
    "TOP_K",
    "SET_PREFIX",
    "Prompts",
    "DecoderIO",
    "Greedy",
    "Divergence",
    "RowResult",
    "GenerationCase",
    "GenerationReport",
    "GenerationSet",
    "make_prompts",
    "default_prompts",
    "is_decoder",
    "greedy",
    "compare",
    "check",
    "write_set",
    "read_set",
    "replay",
    "MANIFEST_KEY",
    "REPORT_FILE",
    "BundleStage",
    "bundle_stage",
    "spec_prompts",
    "verify_bundle",
]

DEFAULT_NEW_TOKENS = 32
#: Batch sizes of the default prompt sets (left padding in all but batch 1).
DEFAULT_BATCHES = (1, 2, 7)
#: Longest default prompt.
DEFAULT_MAX_PROMPT = 16
#: Stored logits of one set above this many bytes keep only the top :data:`TOP_K` per step.
FULL_LOGITS_BYTES = 8 << 20
TOP_K = 64
SET_PREFIX = "generation_set_"

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompts:
    """A batch of left-padded prompts and how many tokens to generate from them.

    Attributes:
        label: the case's name (``"batch=2 prompts=11,4"``).
        input_ids: ``int64 [batch, prompt_len]``; padded positions hold ``pad_id``.
        attention_mask: ``int64 [batch, prompt_len]``: 0 on the left padding, then 1.
        new_tokens: tokens to generate.
    """

    label: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    new_tokens: int

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Real (unpadded) length of each prompt."""
        return [int(n) for n in self.attention_mask.sum(axis=1)]


def make_prompts(
    vocab_size: int,
    lengths: Sequence[int],
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    seed: int = 0,
    pad_id: int = 0,
) -> Prompts:
    """Seeded random prompts of the given real lengths, left-padded to the longest.

    Args:
        vocab_size: token ids are drawn from ``[0, vocab_size)``.
        lengths: one real length (>= 1) per row.
        new_tokens: tokens to generate (>= 1).
        seed: the same (vocab, lengths, seed) gives the same prompts.
        pad_id: id written at padded positions (masked out; any id works).

    Raises:
        UsageError: no rows, a length < 1, ``new_tokens`` < 1, a bad vocabulary size.
    """
    problems = []
    if not lengths:
        problems.append("no prompt lengths given")
    problems += [f"prompt length {n!r} is not an int >= 1" for n in lengths if not (isinstance(n, (int, np.integer)) and n >= 1)]
    if not (isinstance(new_tokens, (int, np.integer)) and new_tokens >= 1):
        problems.append(f"new_tokens {new_tokens!r} is not an int >= 1")
    if not (isinstance(vocab_size, (int, np.integer)) and vocab_size >= 1):
        problems.append(f"vocab_size {vocab_size!r} is not an int >= 1")
    if problems:
        raise UsageError.listing("bad generation prompts", problems)
    width = max(int(n) for n in lengths)
    rng = np.random.default_rng([seed, width, len(lengths)])
    ids = rng.integers(0, vocab_size, size=(len(lengths), width), dtype=np.int64)
    mask = (np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad_id).astype(np.int64)
    label = f"batch={len(lengths)} prompts={','.join(str(int(n)) for n in lengths)}"
    return Prompts(label, ids, mask, int(new_tokens))


def default_prompts(
    vocab_size: int,
    max_positions: int,
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    max_prompt: int = DEFAULT_MAX_PROMPT,
    seed: int = 0,
) -> list[Prompts]:
    """One prompt set per batch size: row 0 the longest prompt, the others seeded shorter ones.

    Raises:
        UsageError: the longest prompt plus ``new_tokens`` does not fit ``max_positions``.
    """
    if max_prompt + new_tokens > max_positions:
        raise UsageError(
            f"generation of {new_tokens} tokens after prompts of up to {max_prompt} tokens needs "
            f"{max_prompt + new_tokens} positions; the model has {max_positions}"
        )
    out = []
    for k, b in enumerate(batches):
        rng = np.random.default_rng([seed, 0x6E4, k])
        longest = max_prompt if b > 1 else max(1, max_prompt // 3)
        lengths = [longest] + [int(n) for n in rng.integers(1, longest + 1, size=b - 1)]
        out.append(make_prompts(vocab_size, lengths, new_tokens=new_tokens, seed=seed + k))
    return out


# ---------------------------------------------------------------------------------------
# the decoder contract
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderIO:
    """Where the KV cache goes in and comes out of a decoder runtime.

    Attributes:
        pairs: ``(past input, present output)`` names per cache tensor, layer order.
        past_shapes: per past input, its shape with ``batch`` and the past length as
            ``None`` (e.g. ``(None, 4, None, 16)``).
        past_dtypes: per past input, its dtype.
    """

    pairs: tuple[tuple[str, str], ...]
    past_shapes: tuple[tuple[int | None, ...], ...]
    past_dtypes: tuple[str, ...]

    @classmethod
    def of(cls, runtime: Runtime) -> DecoderIO:
        """The cache layout of ``runtime``, from its declared inputs and outputs.

        Raises:
            UsageError: the runtime does not follow the decoder contract (every problem listed).
        """
        names = {i.name: i for i in runtime.inputs}
        problems = [f"missing input {n!r}" for n in ("input_ids", "attention_mask") if n not in names]
        if "logits" not in runtime.outputs:
            problems.append("missing output 'logits'")
        past: list[tuple[int, int, IOSpec]] = []
        for i in runtime.inputs:
            m = _PAST.match(i.name)
            if m:
                past.append((int(m.group(1)), 0 if m.group(2) == "key" else 1, i))
            elif i.name not in ("input_ids", "attention_mask"):
                problems.append(f"unexpected input {i.name!r} (a decoder takes input_ids, attention_mask, past_key_values.<i>.key/value)")
        past.sort(key=lambda t: (t[0], t[1]))
        layers = sorted({layer for layer, _kv, _i in past})
        if not past:
            problems.append("no past_key_values.<i>.key/value inputs")
        elif layers != list(range(len(layers))) or len(past) != 2 * len(layers):
            problems.append(f"past_key_values inputs are not a key and a value for layers 0..n-1: {[i.name for *_x, i in past]}")
        pairs, shapes, dtypes = [], [], []
        for layer, kv, spec in past:
            out = f"present.{layer}.{'key' if kv == 0 else 'value'}"
            if out not in runtime.outputs:
                problems.append(f"missing output {out!r} for input {spec.name!r}")
            if spec.shape is None or len(spec.shape) != 4 or not all(isinstance(d, int) for d in (spec.shape[1], spec.shape[3])):
                problems.append(f"input {spec.name!r} has shape {spec.shape_text()}; expected [batch, heads, past, head_dim] with static heads and head_dim")
                continue
            pairs.append((spec.name, out))
            shapes.append((None, int(spec.shape[1]), None, int(spec.shape[3])))  # type: ignore[arg-type]
            dtypes.append(spec.dtype)
        if problems:
            raise UsageError.listing(f"{runtime.describe()} is not a decoder with a KV cache", problems)
        return cls(tuple(pairs), tuple(shapes), tuple(dtypes))

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past tensors of length 0 (the prefill's)."""
        return {
            name: np.zeros((batch, shape[1], 0, shape[3]), dtype=dtype)  # type: ignore[misc]
            for (name, _o), shape, dtype in zip(self.pairs, self.past_shapes, self.past_dtypes)
        }


def is_decoder(input_names: Sequence[str], output_names: Sequence[str]) -> bool:
    """Whether a model's signature follows the decoder contract (names only)."""
    ins = set(input_names)
    return {"input_ids", "attention_mask"} <= ins and "logits" in output_names and any(_PAST.match(n) for n in ins)


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Greedy:
    """What a greedy run produced (or what a stored reference holds).

    Attributes:
        tokens: ``int64 [batch, new_tokens]``.
        logits: ``float32 [batch, new_tokens, K]``: the last position's logits per step.
        logit_ids: ``int64 [batch, new_tokens, K]``, the token id of each entry of
            ``logits``; ``None`` when ``logits`` covers the whole vocabulary (K = vocab).
    """

    tokens: np.ndarray
    logits: np.ndarray
    logit_ids: np.ndarray | None = None

    def top(self, k: int) -> Greedy:
        """The same run keeping only each step's ``k`` largest logits (for storage)."""
        assert self.logit_ids is None, "already reduced"
        k = min(k, self.logits.shape[-1])
        ids = np.argsort(-self.logits, axis=-1, kind="stable")[..., :k].astype(np.int64)
        return Greedy(self.tokens, np.take_along_axis(self.logits, ids, axis=-1), ids)

    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.logits.nbytes + (0 if self.logit_ids is None else self.logit_ids.nbytes))


def greedy(runtime: Runtime, prompts: Prompts, *, static_cache: bool | None = None) -> Greedy:
    """Greedy decoding of ``prompts.new_tokens`` tokens through the KV cache.

    With a growing cache (the serving loop of onnxruntime-genai and Optimum) the prefill
    feeds empty past tensors and every step the mask and the cache grow by one.  With a
    static cache the shapes never change: the cache is a window of ``prompt_len +
    new_tokens`` slots whose unused slots are left padding (mask 0); each step drops the
    oldest slot, which is always such padding.  Position ids come from the mask and masked
    keys get exactly zero attention weight, so both loops compute the same logits; a
    static cache is what a jit-compiled model needs (the jax runtime compiles once per
    input shape: two shapes per prompt set instead of one per step).

    Args:
        runtime: a decoder (see the module docstring for the contract).
        prompts: left-padded prompts.
        static_cache: use the static window; ``None``: for the ``jax`` runtime only.

    Returns:
        The tokens and each step's last-position logits (whole vocabulary).

    Raises:
        UsageError: the runtime is not a decoder.
        RunError: the runtime failed at a step (the step is named).
    """
    io = DecoderIO.of(runtime)
    static = runtime.name == "jax" if static_cache is None else static_cache
    b, width = prompts.input_ids.shape
    slots = width + prompts.new_tokens  # static window: past + new positions of every step
    mask = np.ascontiguousarray(prompts.attention_mask, dtype=np.int64)
    past = io.empty_past(b)
    if static:
        pad = slots - width
        mask = np.concatenate([np.zeros((b, pad), dtype=np.int64), mask], axis=1)
        past = {k: np.zeros(v.shape[:2] + (pad,) + v.shape[3:], dtype=v.dtype) for k, v in past.items()}
    feed: dict[str, np.ndarray] = {"input_ids": np.ascontiguousarray(prompts.input_ids, dtype=np.int64), "attention_mask": mask, **past}
    tokens: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for step in range(prompts.new_tokens):
        try:
            out = runtime.run(feed)
        except RunError as e:
            raise RunError(f"{prompts.label}: step {step} ({'prefill' if step == 0 else 'decode'}): {e}") from e
        last = np.asarray(out["logits"])[:, -1, :].astype(np.float32, copy=True)
        tok = last.argmax(axis=-1).astype(np.int64)
        tokens.append(tok)
        logits.append(last)
        mask = np.concatenate([feed["attention_mask"], np.ones((b, 1), dtype=np.int64)], axis=1)
        past = {p: np.asarray(out[present]) for p, present in io.pairs}
        if static:
            assert not mask[:, 0].any(), "the static window dropped a real position"
            mask = mask[:, 1:]
            past = {k: v[:, :, 1:] for k, v in past.items()}
        feed = {"input_ids": tok[:, None], "attention_mask": mask, **past}
    return Greedy(np.stack(tokens, axis=1), np.stack(logits, axis=1))


# ---------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Divergence:
    """The first step where a row's candidate token differs from the reference's.

    ``*_logit_of_*``: the logit each side gave each token (``None`` where the stored
    reference does not hold that token's logit).
    """

    row: int
    step: int
    expected_token: int
    got_token: int
    expected_logit_of_expected: float
    expected_logit_of_got: float | None
    got_logit_of_expected: float
    got_logit_of_got: float
    margin: float

    def line(self) -> str:
        eg = "?" if self.expected_logit_of_got is None else f"{self.expected_logit_of_got:.6g}"
        return (
            f"row {self.row} diverges at step {self.step}: expected token {self.expected_token} "
            f"(reference logit {self.expected_logit_of_expected:.6g}, candidate {self.got_logit_of_expected:.6g}), "
            f"got token {self.got_token} (reference logit {eg}, candidate {self.got_logit_of_got:.6g}); "
            f"reference top-2 margin {self.margin:.3g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "step": self.step,
            "expected_token": self.expected_token,
            "got_token": self.got_token,
            "expected_logit_of_expected": self.expected_logit_of_expected,
            "expected_logit_of_got": self.expected_logit_of_got,
            "got_logit_of_expected": self.got_logit_of_expected,
            "got_logit_of_got": self.got_logit_of_got,
            "margin": self.margin,
        }


@dataclass(frozen=True)
class RowResult:
    """One prompt of a case.

    Attributes:
        row: index in the batch.
        prompt_length: real tokens of the prompt.
        steps_compared: steps whose logits were compared (all, or up to and including the
            first ambiguous or divergent step).
        tokens_matched: steps whose token equals the reference's (before any stop).
        ambiguous_step: the first step whose reference top-2 margin is under the
            ambiguity threshold (comparison ends there), else None.
        ambiguous_margin: that margin.
        divergence: the first non-ambiguous step with a different token, else None.
        max_abs: worst logit error over the compared steps.
        n_bad: logits out of tolerance over the compared steps.
        n_compared: logits compared.
        ok: no divergence and every compared logit within tolerance.
    """

    row: int
    prompt_length: int
    steps_compared: int
    tokens_matched: int
    ambiguous_step: int | None
    ambiguous_margin: float | None
    divergence: Divergence | None
    max_abs: float
    n_bad: int
    n_compared: int
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "prompt_length": self.prompt_length,
            "steps_compared": self.steps_compared,
            "tokens_matched": self.tokens_matched,
            "ambiguous_step": self.ambiguous_step,
            "ambiguous_margin": self.ambiguous_margin,
            "divergence": None if self.divergence is None else self.divergence.to_dict(),
            "max_abs": self.max_abs,
            "n_bad": self.n_bad,
            "n_compared": self.n_compared,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class GenerationCase:
    """One prompt set: per-row results, or why the candidate could not run it.

    Attributes:
        label: the prompt set's label.
        batch, new_tokens, prompt_lengths: what was generated.
        atol, rtol: the logits tolerance.
        rows: per-row results (empty when the candidate failed to run).
        reason: why the case failed beyond the numbers (a runtime failure), else "".
        checks: the case as parity checks (``generated_tokens``, ``step_logits``), so it
            joins a ParityReport (tables, JUnit, JSON) like any output.
    """

    label: str
    batch: int
    new_tokens: int
    prompt_lengths: tuple[int, ...]
    atol: float
    rtol: float
    rows: tuple[RowResult, ...]
    reason: str = ""
    checks: tuple[OutputCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reason and len(self.rows) == self.batch and all(r.ok for r in self.rows)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def steps_compared(self) -> int:
        return sum(r.steps_compared for r in self.rows)

    @property
    def max_abs(self) -> float:
        return max((r.max_abs for r in self.rows), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.label,
            "batch": self.batch,
            "new_tokens": self.new_tokens,
            "prompt_lengths": list(self.prompt_lengths),
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
            "reason": self.reason,
            "tokens_generated": self.batch * self.new_tokens,
            "steps_compared": self.steps_compared,
            "max_abs": self.max_abs,
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass(frozen=True)
class GenerationReport:
    """Generation parity of one candidate against one reference over every prompt set.

    ``bool(report)`` is the verdict: at least one case, and every case passes.
    """

    model: str
    reference: str
    candidate: str
    cases: tuple[GenerationCase, ...]

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def tokens_generated(self) -> int:
        return sum(c.batch * c.new_tokens for c in self.cases)

    @property
    def steps_compared(self) -> int:
        return sum(c.steps_compared for c in self.cases)

    @property
    def ambiguous_steps(self) -> list[tuple[str, int, int]]:
        """``(case, row, step)`` of every ambiguous step."""
        return [(c.label, r.row, r.ambiguous_step) for c in self.cases for r in c.rows if r.ambiguous_step is not None]

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.cases), default=0.0)

    def failures(self) -> list[str]:
        """One line per failing case or row."""
        out = []
        for c in self.cases:
            if c.reason:
                out.append(f"{c.label}: {c.reason}")
            for r in c.rows:
                if r.divergence is not None:
                    out.append(f"{c.label}: {r.divergence.line()}")
                if r.n_bad:
                    out.append(
                        f"{c.label}: row {r.row}: {r.n_bad}/{r.n_compared} step logits out of tolerance "
                        f"(max_abs {r.max_abs:.3g}, tolerance atol={c.atol:g} rtol={c.rtol:g})"
                    )
        return out

    def summary(self) -> str:
        """``"generation onnxruntime vs torch: PASS, 3 cases, 320 tokens generated, ..."``."""
        amb = self.ambiguous_steps
        return (
            f"generation {self.candidate} vs {self.reference}: {'PASS' if self.ok else 'FAIL'}, "
            f"{len(self.cases)} cases, {self.tokens_generated} tokens generated, "
            f"{self.steps_compared} steps compared ({len(amb)} ambiguous), worst logit error {self.max_abs:.3g}"
        )

    def checks(self) -> list[OutputCheck]:
        """Every case as parity checks (for a ParityReport)."""
        return [chk for c in self.cases for chk in c.checks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "reference": self.reference,
            "candidate": self.candidate,
            "ok": self.ok,
            "tokens_generated": self.tokens_generated,
            "steps_compared": self.steps_compared,
            "ambiguous_steps": [list(a) for a in self.ambiguous_steps],
            "max_abs": self.max_abs,
            "failures": self.failures(),
            "cases": [c.to_dict() for c in self.cases],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def ambiguity_threshold(top1: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Top-2 margins under this are ties: each logit may move by ``atol + rtol*|top1|``, in opposite directions."""
    return 2.0 * (atol + rtol * np.abs(top1))


def _case_checks(
    label: str,
    dims: Mapping[str, int],
    exp_tok: list[int],
    got_tok: list[int],
    exp_logits: list[np.ndarray],
    got_logits: list[np.ndarray],
    tol: Tolerance,
    divergences: list[Divergence],
) -> tuple[OutputCheck, ...]:
    from exporter.parity import compare

    def tol_for(_output: str, _dtype: str) -> Tolerance:
        return tol

    ref = {
        "generated_tokens": np.asarray(exp_tok, dtype=np.int64),
        "step_logits": np.concatenate(exp_logits) if exp_logits else np.zeros(0, np.float32),
    }
    got = {
        "generated_tokens": np.asarray(got_tok, dtype=np.int64),
        "step_logits": np.concatenate(got_logits) if got_logits else np.zeros(0, np.float32),
    }
    checks = compare(ref, got, tol_for, case=f"generation {label}", dims=dict(dims))
    if divergences:
        checks[0] = replace(checks[0], reason="; ".join(d.line() for d in divergences), ok=False)
    return tuple(checks)


def compare(expected: Greedy, got: Greedy, prompts: Prompts, tolerance: Tolerance) -> GenerationCase:
    """Compare a candidate's greedy run with the reference's.

    Args:
        expected: the reference's run (full logits, or a stored top-K).
        got: the candidate's run (full logits).
        prompts: the prompts both ran.
        tolerance: the logits tolerance.

    Returns:
        The case, with one :class:`RowResult` per prompt.
    """
    atol, rtol = float(tolerance.atol), float(tolerance.rtol)
    b, n = expected.tokens.shape
    assert got.tokens.shape == (b, n), (got.tokens.shape, (b, n))
    rows: list[RowResult] = []
    exp_tok: list[int] = []
    got_tok: list[int] = []
    exp_l: list[np.ndarray] = []
    got_l: list[np.ndarray] = []
    divergences: list[Divergence] = []
    for row in range(b):
        ambiguous_step = margin_at = None
        divergence = None
        compared = matched = n_bad = n_compared = 0
        worst = 0.0
        for step in range(n):
            r = expected.logits[row, step].astype(np.float64)
            full = got.logits[row, step]
            c = full if expected.logit_ids is None else full[expected.logit_ids[row, step]]
            c = c.astype(np.float64)
            err = np.abs(c - r)
            bad = ~(err <= atol + rtol * np.abs(r))  # NaN counts as bad
            compared += 1
            n_bad += int(bad.sum())
            n_compared += int(r.size)
            worst = max(worst, float(err.max()) if np.isfinite(err).all() else float("inf"))
            exp_l.append(r.astype(np.float32))
            got_l.append(c.astype(np.float32))
            top2 = np.sort(r)[-2:] if r.size >= 2 else np.array([-np.inf, r.max()])
            margin = float(top2[1] - top2[0])
            e_tok, g_tok = int(expected.tokens[row, step]), int(got.tokens[row, step])
            if margin < float(ambiguity_threshold(top2[1], atol, rtol)):
                ambiguous_step, margin_at = step, margin
                break
            exp_tok.append(e_tok)
            got_tok.append(g_tok)
            if e_tok != g_tok:
                if expected.logit_ids is None:
                    e_of_g: float | None = float(expected.logits[row, step, g_tok])
                else:
                    hit = np.nonzero(expected.logit_ids[row, step] == g_tok)[0]
                    e_of_g = float(expected.logits[row, step, hit[0]]) if hit.size else None
                ref_full_idx = e_tok if expected.logit_ids is None else int(np.nonzero(expected.logit_ids[row, step] == e_tok)[0][0])
                divergence = Divergence(
                    row=row,
                    step=step,
                    expected_token=e_tok,
                    got_token=g_tok,
                    expected_logit_of_expected=float(expected.logits[row, step, ref_full_idx]),
                    expected_logit_of_got=e_of_g,
                    got_logit_of_expected=float(full[e_tok]),
                    got_logit_of_got=float(full[g_tok]),
                    margin=margin,
                )
                divergences.append(divergence)
                break
            matched += 1
        rows.append(
            RowResult(
                row=row,
                prompt_length=int(prompts.attention_mask[row].sum()),
                steps_compared=compared,
                tokens_matched=matched,
                ambiguous_step=ambiguous_step,
                ambiguous_margin=margin_at,
                divergence=divergence,
                max_abs=worst,
                n_bad=n_bad,
                n_compared=n_compared,
                ok=divergence is None and n_bad == 0,
            )
        )
    dims = {"batch": b, "new_tokens": n}
    checks = _case_checks(prompts.label, dims, exp_tok, got_tok, exp_l, got_l, tolerance, divergences)
    return GenerationCase(
        label=prompts.label,
        batch=b,
        new_tokens=n,
        prompt_lengths=tuple(prompts.lengths),
        atol=atol,
        rtol=rtol,
        rows=tuple(rows),
        checks=checks,
    )


def _failed_case(prompts: Prompts, tolerance: Tolerance, reason: str) -> GenerationCase:
    from exporter.parity import OutputCheck

    check = OutputCheck(
        output="generated_tokens", case=f"generation {prompts.label}", dims={"batch": prompts.batch, "new_tokens": prompts.new_tokens},
        shape=(prompts.batch, prompts.new_tokens), dtype="int64", atol=0.0, rtol=0.0, rel_floor=0.0, max_abs=None,
        max_rel=None, mean_abs=None, p99_abs=None, n_bad=prompts.batch * prompts.new_tokens,
        n_total=prompts.batch * prompts.new_tokens, nan_mismatch=0, ok=False, reason=reason,
    )  # fmt: skip
    return GenerationCase(
        label=prompts.label,
        batch=prompts.batch,
        new_tokens=prompts.new_tokens,
        prompt_lengths=tuple(prompts.lengths),
        atol=float(tolerance.atol),
        rtol=float(tolerance.rtol),
        rows=(),
        reason=reason,
        checks=(check,),
    )


def _candidate_case(candidate: Runtime, prompts: Prompts, expected: Greedy, tolerance: Tolerance) -> GenerationCase:
    try:
        got = greedy(candidate, prompts)
    except RunError as e:  # the candidate could not run a step: a verdict, not a crash
        return _failed_case(prompts, tolerance, f"{candidate.name} failed to run: {' '.join(str(e).split())[:400]}")
    return compare(expected, got, prompts, tolerance)


def check(
    reference: Runtime | Sequence[Greedy],
    candidate: Runtime,
    prompts: Sequence[Prompts],
    tolerance: Tolerance,
    *,
    model: str = "",
    reference_name: str | None = None,
) -> GenerationReport:
    """Generation parity of ``candidate`` against ``reference`` on every prompt set.

    Args:
        reference: the runtime taken as truth (the framework build), or its runs computed
            earlier (one :class:`Greedy` per prompt set, so it can be freed first).
        candidate: the runtime under test.
        prompts: the prompt sets.
        tolerance: the logits tolerance.
        model: the model's name, for the report.
        reference_name: the reference's name when ``reference`` is a list of runs.

    Returns:
        The report; a reference that fails propagates, a candidate's ``RunError`` fails its case.
    """
    if isinstance(reference, Sequence):
        expected = list(reference)
        name = reference_name or "reference"
    else:
        expected = [greedy(reference, p) for p in prompts]
        name = reference.name
    assert len(expected) == len(prompts), (len(expected), len(prompts))
    cases = tuple(_candidate_case(candidate, p, e, tolerance) for p, e in zip(prompts, expected))
    return GenerationReport(model=model, reference=name, candidate=candidate.name, cases=cases)


# ---------------------------------------------------------------------------------------
# test data
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSet:
    """The description of one stored prompt set (kept in the bundle manifest).

    Attributes:
        dir: the set's directory name (``generation_set_0``).
        case: the prompts' label.
        batch, new_tokens, prompt_lengths: as :class:`Prompts`.
        logits: ``"full"`` or ``"top-64"``: what ``expected_1.pb`` holds.
    """

    dir: str
    case: str
    batch: int
    new_tokens: int
    prompt_lengths: tuple[int, ...]
    logits: str = "full"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "case": self.case,
            "batch": self.batch,
            "new_tokens": self.new_tokens,
            "prompt_lengths": list(self.prompt_lengths),
            "logits": self.logits,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationSet:
        """Inverse of :meth:`to_dict`.

        Raises:
            BundleError: a field is missing or of the wrong type.
        """
        try:
            return cls(
                dir=str(d["dir"]),
                case=str(d["case"]),
                batch=int(d["batch"]),
                new_tokens=int(d["new_tokens"]),
                prompt_lengths=tuple(int(x) for x in d["prompt_lengths"]),
                logits=str(d.get("logits", "full")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"generation set entry {dict(d)!r} is malformed ({type(e).__name__}: {e}); re-export the bundle") from None


def write_set(directory: str | os.PathLike[str], prompts: Prompts, expected: Greedy, *, full_logits_bytes: int = FULL_LOGITS_BYTES) -> GenerationSet:
    """Write one prompt set and the reference's run (see the module docstring for the files).

    Args:
        directory: the set's directory (created).
        prompts: the prompts.
        expected: the reference's run with whole-vocabulary logits.
        full_logits_bytes: above this, only the top :data:`TOP_K` logits per step are kept.

    Returns:
        The set's description for the manifest.
    """
    from exporter.testdata import write_tensors

    d = Path(directory)
    stored = expected if expected.logits.nbytes <= full_logits_bytes else expected.top(TOP_K)
    write_tensors(d, "prompt", {"input_ids": prompts.input_ids, "attention_mask": prompts.attention_mask})
    tensors = {"tokens": stored.tokens, "logits": stored.logits.astype(np.float32)}
    if stored.logit_ids is not None:
        tensors["logit_ids"] = stored.logit_ids
    write_tensors(d, "expected", tensors)
    return GenerationSet(
        dir=d.name,
        case=prompts.label,
        batch=prompts.batch,
        new_tokens=prompts.new_tokens,
        prompt_lengths=tuple(prompts.lengths),
        logits="full" if stored.logit_ids is None else f"top-{stored.logits.shape[-1]}",
    )


def read_set(root: str | os.PathLike[str], entry: GenerationSet) -> tuple[Prompts, Greedy]:
    """Read one stored prompt set back.

    Raises:
        BundleError: missing files, a file that is not a TensorProto, or shapes that do not
            agree with each other or with the entry.
    """
    from exporter.testdata import read_tensors

    d = Path(root) / entry.dir
    if not d.is_dir():
        raise BundleError(f"generation set {entry.dir} is missing from {str(root)!r}; re-export the bundle")
    prompt = read_tensors(d, "prompt")
    exp = read_tensors(d, "expected")
    problems = [f"missing {what}" for what, have in (("prompt input_ids", "input_ids" in prompt), ("prompt attention_mask", "attention_mask" in prompt), ("expected tokens", "tokens" in exp), ("expected logits", "logits" in exp)) if not have]
    if not problems:
        ids, mask, tok, lg = prompt["input_ids"], prompt["attention_mask"], exp["tokens"], exp["logits"]
        b, n = entry.batch, entry.new_tokens
        if ids.shape != mask.shape or ids.ndim != 2 or ids.shape[0] != b:
            problems.append(f"prompt shapes {ids.shape} / {mask.shape}, expected [{b}, prompt_len] twice")
        if tok.shape != (b, n):
            problems.append(f"expected tokens shape {tok.shape}, expected {(b, n)}")
        if lg.ndim != 3 or lg.shape[:2] != (b, n):
            problems.append(f"expected logits shape {lg.shape}, expected [{b}, {n}, K]")
        ids_k = exp.get("logit_ids")
        if ids_k is not None and ids_k.shape != lg.shape:
            problems.append(f"logit_ids shape {ids_k.shape} differs from logits shape {lg.shape}")
    if problems:
        raise BundleError.listing(f"generation set {str(d)!r} is corrupt; re-export the bundle", problems)
    prompts = Prompts(entry.case, prompt["input_ids"].astype(np.int64), prompt["attention_mask"].astype(np.int64), entry.new_tokens)
    return prompts, Greedy(exp["tokens"].astype(np.int64), exp["logits"].astype(np.float32), exp.get("logit_ids"))


def replay(
    root: str | os.PathLike[str],
    sets: Sequence[GenerationSet | Mapping[str, Any]],
    candidate: Runtime,
    tolerance: Tolerance,
    *,
    model: str = "",
    reference_name: str = "bundle test data",
) -> GenerationReport:
    """Rerun stored prompt sets in ``candidate`` and compare with the stored reference runs.

    Needs neither torch nor jax: the reference is the files.

    Args:
        root: the directory holding the ``generation_set_<k>`` directories (the bundle).
        sets: their descriptions (from the manifest).
        candidate: the runtime to check (an ONNX runtime over the bundle's model.onnx).
        tolerance: the logits tolerance.

    Raises:
        BundleError: a set is missing or corrupt.
    """
    entries = [s if isinstance(s, GenerationSet) else GenerationSet.from_dict(s) for s in sets]
    cases = []
    for entry in entries:
        prompts, expected = read_set(root, entry)
        cases.append(_candidate_case(candidate, prompts, expected, tolerance))
    return GenerationReport(model=model, reference=reference_name, candidate=candidate.name, cases=tuple(cases))


# ---------------------------------------------------------------------------------------
# bundles (called by exporter.bundle: build and verify)
# ---------------------------------------------------------------------------------------
#: The manifest key of a decoder bundle's generation sets.
MANIFEST_KEY = "generation"
#: The full report of the export's generation check, beside parity.json.
REPORT_FILE = "generation.json"


def spec_prompts(spec: Any, seed: int = 0) -> list[Prompts]:
    """The prompt sets of a decoder spec: its own (``spec.generation_prompts(seed)``) or the
    defaults, with the vocabulary taken from ``input_ids``' value range."""
    own = getattr(spec, "generation_prompts", None)
    if own is not None:
        return list(own(seed))
    ids = next(t for t in spec.inputs if t.name == "input_ids")
    return default_prompts(int(ids.high), 1 << 30, seed=seed)


@dataclass
class BundleStage:
    """Generation parity inside a bundle build: the reference's runs, then the candidate's.

    Made by :func:`bundle_stage` while the framework model is loaded; :meth:`check` runs
    the candidate (onnxruntime) once it is, :meth:`write` writes the sets and the report.
    """

    model: str
    prompts: list[Prompts]
    runs: list[Greedy]
    reference: str
    tolerance: Tolerance
    report: GenerationReport | None = None

    def check(self, candidate: Runtime) -> GenerationReport:
        """Run every prompt set in ``candidate`` and compare (kept in :attr:`report`)."""
        self.report = check(self.runs, candidate, self.prompts, self.tolerance, model=self.model, reference_name=self.reference)
        return self.report

    def write(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write ``generation_set_<k>`` and :data:`REPORT_FILE` into the bundle; returns the manifest section."""
        d = Path(directory)
        sets = [write_set(d / f"{SET_PREFIX}{k}", p, r).to_dict() for k, (p, r) in enumerate(zip(self.prompts, self.runs))]
        section: dict[str, Any] = {"sets": sets, "tolerance": self.tolerance.to_dict(), "reference": self.reference, "report": REPORT_FILE}
        if self.report is not None:
            (d / REPORT_FILE).write_text(self.report.to_json() + "\n", encoding="utf-8")
            full = self.report.to_dict()
            section["summary"] = {k: full[k] for k in ("ok", "tokens_generated", "steps_compared", "ambiguous_steps", "max_abs", "failures")}
        return section


def bundle_stage(spec: Any, reference: Runtime, tolerance: Callable[[str, str], Tolerance], seed: int = 0) -> BundleStage | None:
    """The reference's greedy runs for a decoder bundle; ``None`` for any other model.

    Args:
        spec: the registry entry (a decoder when its signature follows the contract).
        reference: the framework runtime (torch, or jax: then with a static cache).
        tolerance: the bundle's ``(output, dtype) -> Tolerance``; ``logits``' is used.
        seed: seed of the prompts.
    """
    if not is_decoder([t.name for t in spec.inputs], spec.outputs):
        return None
    prompts = spec_prompts(spec, seed)
    runs = [greedy(reference, p) for p in prompts]
    return BundleStage(spec.name, prompts, runs, reference.name, tolerance("logits", "float32"))


def verify_bundle(root: str | os.PathLike[str], manifest: Mapping[str, Any], candidate: Runtime, tolerance: Callable[[str, str], Tolerance]) -> GenerationReport | None:
    """Replay a bundle's generation sets in ``candidate``; ``None`` when it has none.

    Raises:
        BundleError: the manifest's generation section or a set is malformed or missing.
    """
    section = manifest.get(MANIFEST_KEY)
    if section is None:
        return None
    if not isinstance(section, Mapping) or not isinstance(section.get("sets"), list) or not section["sets"]:
        raise BundleError(f"bundle {str(root)!r}: the manifest's {MANIFEST_KEY!r} section is malformed (no sets); re-export the bundle")
    return replay(root, section["sets"], candidate, tolerance("logits", "float32"), model=str(manifest.get("model", "")))
