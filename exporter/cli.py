"""``python -m exporter``: argument parsing only; every flag maps to a keyword of ``exporter.api``.

    exporter [--registry MODULE] list    [--json]
    exporter [--registry MODULE] inspect PATH [--json]          (a bundle, model-zoo dir or .onnx file; or a saved state)
    exporter [--registry MODULE] export  MODEL... | --all [--checkpoint PATH] [--config FILE] [--framework torch|flax|all]
                                         [--out DIR] [--opset N] [--batch-sizes 1,2,7,64] [--atol X] [--rtol Y]
                                         [--inputs FILE.npz] [--seed S] [--external-data] [-v] [--json] [--junit FILE]
    exporter [--registry MODULE] verify  BUNDLE|DIR... [--runtime onnxruntime|reference|node|openvino|browser]
                                         [--runtime-option KEY=VALUE]... [--atol X] [--rtol Y] [--json] [--junit FILE]
    exporter [--registry MODULE] explain BUNDLE [--checkpoint PATH] [--runtime onnxruntime|reference]
                                         [--case LABEL]... [--atol X] [--rtol Y] [--all-elements] [--json]
    exporter [--registry MODULE] report  OUT_DIR [--html FILE] [--json]
    exporter [--registry MODULE] convert SRC DST [--model NAME --to torch|flax] [--format FMT] [--json]
    exporter [--registry MODULE] train   MODEL --ckpt-dir DIR --steps N [--every K] [--keep N]
                                         [--keep-every M] [--framework torch|flax] [--seed S] [--json]
                                         [--nproc P [--strategy ddp|fsdp] | --devices P]

Exit codes: 0 success, 1 parity/verification failure, 2 bad usage or bad input (one
``Type: message`` on stderr, no traceback; with ``--json`` also a JSON object on stdout
holding the error's full ``problems`` list).  Reports go to stdout (``--json``: JSON);
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from exporter import atomic
from exporter.errors import ExporterError

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,7,64, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,7,64, got {text!r}")
    return sizes


def _dim_sizes(text: str) -> dict[str, list[int]]:
    name, sep, sizes = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected DIM=LIST like seq=1,16,64, got {text!r}")
    try:
        return {name.strip(): _batch_sizes(sizes)}
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected DIM=LIST of positive integers like seq=1,16,64, got {text!r}") from None


def _rename_rule(text: str) -> tuple[str, str]:
    pattern, sep, replacement = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected REGEX=REPLACEMENT like '^encoder\\.=bert.encoder.', got {text!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"bad regular expression {pattern!r}: {e}") from None
    return pattern, replacement


class _MergeDims(argparse.Action):
    """``--dims seq=1,2 --dims n=3`` -> ``{"seq": [1, 2], "n": [3]}``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **values})


def _add_rename(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rename",
        type=_rename_rule,
        action="append",
        default=[],
        metavar="REGEX=REPLACEMENT",
        help="rename checkpoint keys before the strict check (repeatable; applied in order)",
    )


def _nonneg_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return x


def _runtime_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like INFERENCE_PRECISION_HINT=f32, got {text!r}")
    return key.strip(), value.strip()


#: ``verify --runtime`` choices: the runtimes that load an .onnx file (tests check this
#: against exporter.runtimes.base.RUNTIMES; importing that here would slow down --help).
VERIFY_RUNTIMES = ("onnxruntime", "reference", "node", "openvino", "browser")
#: ``explain --runtime`` choices (== exporter.divergence.RUNTIMES; tests check it).
EXPLAIN_RUNTIMES = ("onnxruntime", "reference")


def _positive_int(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if x < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from exporter import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        action="append",
        metavar="MODULE",
        default=argparse.SUPPRESS,
        help="import MODULE (it calls exporter.models.registry.register) before running; repeatable or comma-separated",
    )
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="Rebuild models from saved state, export them to ONNX, and prove the export matches.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"exporter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", parents=[common], help="list registry models and their frameworks")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("inspect", parents=[common], help="describe a model (bundle, model-zoo dir, .onnx) or a saved state")
    p.add_argument(
        "checkpoint",
        metavar="PATH",
        help="a bundle, model-zoo directory or .onnx file (provenance, verdict, inputs/outputs, opset, size), "
        "or a state file / checkpoint directory (format, tensors, bytes, sha256)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("export", parents=[common], help="export to ONNX and check parity over a batch-size sweep")
    p.add_argument("model", metavar="MODEL", nargs="*", help="registry name(s) (see `exporter list`)")
    p.add_argument("--all", dest="all_models", action="store_true", help="export every registry model")
    p.add_argument("--checkpoint", metavar="PATH", help="saved state to export (default: a seeded initial state)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="config of a model family (bert, gpt2, resnet), JSON; default: config.json beside --checkpoint, "
        "else the family's default",
    )
    p.add_argument("--framework", choices=("torch", "flax", "all"), default="all", help="which build to export (default: all)")
    p.add_argument("--out", default="out", metavar="DIR", help="output root; bundles go to DIR/<model>/<framework> (default: out)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: 20)")
    p.add_argument("--batch-sizes", type=_batch_sizes, metavar="LIST", help="parity sweep batch sizes (default: 1,2,7,64)")
    _add_rename(p)
    p.add_argument(
        "--dims",
        type=_dim_sizes,
        action=_MergeDims,
        metavar="DIM=LIST",
        help="sizes of another dynamic dim crossed with the batch sizes, e.g. seq=1,16,64 "
        "(repeatable; default: the model's sweep dims)",
    )
    p.add_argument("--atol", type=_nonneg_float, metavar="X", help="absolute tolerance (default: the model's, by dtype)")
    p.add_argument("--rtol", type=_nonneg_float, metavar="Y", help="relative tolerance (default: the model's, by dtype)")
    p.add_argument("--inputs", metavar="FILE.npz", help="user inputs (one array per model input) checked as one more case")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial state and of the sweep inputs (default: 0)")
    p.add_argument("--external-data", action="store_true", default=None, help="always write weights to model.onnx.data")
    p.add_argument(
        "--variants",
        metavar="LIST",
        help="also make these variants of every bundle, each judged against the framework: any of "
        "optimized,fp16,int8 (bundles DIR/<model>/<framework>-<variant>; default: none)",
    )
    p.add_argument(
        "--int8-mode",
        choices=("dynamic", "static"),
        help="int8 variant: dynamic quantization (default) or static QDQ calibrated on the sweep (or --inputs)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild every bundle (default: a bundle made from the same checkpoint, model code, config, options "
        "and versions, that passed and whose files are intact, is reported up to date and not rebuilt)",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="export models in N worker processes (default: 1); same report order and exit code as one",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print every bundle's per-case parity table")
    p.add_argument(
        "--no-explain",
        dest="explain",
        action="store_false",
        help="do not run `explain` on a bundle that fails (by default its report goes into parity.json)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")

    p = sub.add_parser(
        "explain", parents=[common], help="which module of a bundle's model broke: the first whose ONNX output leaves tolerance"
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (OUT/<model>/<framework>)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="the state the bundle was exported from (default: its state.safetensors or the manifest's path; "
        "its sha256 must match the manifest's)",
    )
    p.add_argument("--runtime", choices=EXPLAIN_RUNTIMES, default="onnxruntime", help="default: onnxruntime (unoptimised copy)")
    p.add_argument(
        "--case", dest="cases", action="append", metavar="LABEL", help="only this test case, e.g. batch=2,seq=16 (repeatable; default: all)"
    )
    _add_rename(p)
    p.add_argument("--atol", type=_nonneg_float, metavar="X", help="override the manifest's absolute tolerance")
    p.add_argument("--rtol", type=_nonneg_float, metavar="Y", help="override the manifest's relative tolerance")
    p.add_argument(
        "--all-elements", action="store_true", help="compare every element, also those no output depends on (e.g. padding)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("verify", parents=[common], help="rerun a bundle's test data in a runtime (needs only onnx + the runtime)")
    p.add_argument(
        "bundles",
        metavar="BUNDLE",
        nargs="+",
        help="bundle directory, an export's --out directory, or an ONNX model-zoo directory (model.onnx + test_data_set_<k>/)",
    )
    p.add_argument("--runtime", choices=VERIFY_RUNTIMES, default="onnxruntime", help="default: onnxruntime")
    p.add_argument(
        "--runtime-option",
        type=_runtime_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a runtime setting, recorded in the report (repeatable; openvino: e.g. INFERENCE_PRECISION_HINT=f32)",
    )
    p.add_argument("--atol", type=_nonneg_float, metavar="X", help="override the manifest's absolute tolerance")
    p.add_argument("--rtol", type=_nonneg_float, metavar="Y", help="override the manifest's relative tolerance")
    p.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")

    p = sub.add_parser("report", parents=[common], help="one-line-per-bundle summary and a self-contained HTML report")
    p.add_argument("out_dir", metavar="OUT_DIR", help="an export's --out directory (or one bundle)")
    p.add_argument("--html", metavar="FILE", help="write the HTML report (verdicts, error plots, provenance) to FILE")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("convert", parents=[common], help="convert saved state between formats and frameworks")
    p.add_argument("src", metavar="SRC", help="state to read (format sniffed from its bytes)")
    p.add_argument("dst", metavar="DST", help="state to write (format from its extension, or --format)")
    p.add_argument("--model", metavar="NAME", help="check the state against this registry model (needed for --to)")
    p.add_argument("--to", choices=("torch", "flax"), help="layout to write: torch (canonical) or flax")
    _add_rename(p)
    p.add_argument(
        "--format", choices=("safetensors", "torch", "npz", "flax-msgpack", "orbax"), help="output format (default: from DST's extension)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("train", parents=[common], help="train with crash-safe checkpoints; resumes from --ckpt-dir")
    p.add_argument("model", metavar="MODEL", help="registry name")
    p.add_argument("--ckpt-dir", required=True, metavar="DIR", help="checkpoint directory (resumed from if it holds a run)")
    p.add_argument("--steps", required=True, type=_positive_int, metavar="N", help="total steps")
    p.add_argument("--every", type=_positive_int, default=10, metavar="K", help="checkpoint every K steps (default: 10)")
    p.add_argument("--keep", type=_positive_int, default=3, metavar="N", help="keep the last N checkpoints (default: 3)")
    p.add_argument("--keep-every", type=_positive_int, metavar="M", help="also keep every checkpoint whose step is a multiple of M")
    p.add_argument("--framework", choices=("torch", "flax"), default="torch", help="default: torch")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="synthetic-data batch size (default: 8)")
    p.add_argument("--dataset-size", type=_positive_int, default=64, metavar="N", help="synthetic dataset size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--nproc", type=_positive_int, metavar="P", help="torch: run P torch.distributed ranks (gloo, CPU), DCP checkpoints")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), help="with --nproc or under torchrun: DDP (default) or FSDP2")
    p.add_argument("--devices", type=_positive_int, metavar="P", help="flax: data parallel over P JAX devices, orbax checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


# --------------------------------------------------------------------------- commands
def _print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    models = api.list_models()
    if args.json:
        _print_json([m.to_dict() for m in models], out)
        return EXIT_OK
    rows = [("name", "frameworks", "inputs -> outputs", "summary")]
    rows += [(m.name, ",".join(m.frameworks), m.signature(), m.summary) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3] + "\n")
    families = [line for m in models if (line := m.family_line())]
    if families:
        out.write("\nfamilies (sized by config.json beside --checkpoint, or --config FILE; * = required field):\n")
        out.write("".join(f"  {line}\n" for line in families))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    info = api.inspect(args.checkpoint)
    if args.json:
        _print_json(info.to_dict(), out)
    else:
        out.write("\n".join(info.lines()) + "\n")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api
    from exporter.progress import Progress
    from exporter.report import export_summary

    progress = Progress(err)  # a bar on a terminal, plain lines otherwise
    report = api.export(
        args.model or None,
        all_models=args.all_models,
        checkpoint=args.checkpoint,
        framework=args.framework,
        out=args.out,
        opset=args.opset,
        batch_sizes=args.batch_sizes,
        dims=args.dims,
        rename=args.rename,
        atol=args.atol,
        rtol=args.rtol,
        inputs=args.inputs,
        seed=args.seed,
        external_data=args.external_data,
        progress=progress,
        config=args.config,
        explain_failures=args.explain,
        variants=args.variants,
        variant_options=None if args.int8_mode is None else {"int8": {"mode": args.int8_mode}},
        force=args.force,
        jobs=args.jobs,
    )
    progress.close()
    if args.junit:
        atomic.write_text(args.junit, report.to_junit_xml())
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        out.write((report.table() if args.verbose else export_summary(report)) + "\n")
        if not args.verbose:  # the verbose table has them already
            for r in report.results:
                if r.explain is not None:
                    out.write("\n".join([r.explain.summary(), *r.explain.lines()]) + "\n")
                for v in r.variants:
                    out.write(v.table(elementwise=False) + "\n")
    for e in report.errors:  # also on stderr, as `Type: message`, for scripts that only watch stderr
        err.write(f"{e.error}: {e.model} ({e.framework}): {e.message}\n")
    return report.exit_code


def _cmd_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    report = api.explain(
        args.bundle,
        checkpoint=args.checkpoint,
        runtime=args.runtime,
        rename=args.rename,
        cases=args.cases,
        atol=args.atol,
        rtol=args.rtol,
        relevant_only=not args.all_elements,
    )
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        out.write(report.table() + "\n")
    return EXIT_OK if report.ok else EXIT_FAIL


def _cmd_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    report = api.verify_all(
        args.bundles, args.runtime, atol=args.atol, rtol=args.rtol, runtime_options=dict(args.runtime_option) or None
    )
    if args.junit:
        atomic.write_text(args.junit, report.to_junit_xml())
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        out.write(report.table() + "\n")
    return report.exit_code


def _cmd_report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    report = api.report(args.out_dir, html=args.html)
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        out.write(report.table() + "\n")
    return EXIT_OK if report.ok else EXIT_FAIL


def _cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    report = api.convert(args.src, args.dst, model=args.model, to=args.to, format=args.format, rename=args.rename)
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        out.write(report.line() + "\n")
    return EXIT_OK


def _cmd_train(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from exporter import api

    # Resume decisions ("resuming from ...", "removed leftover ...") and every skipped
    # corrupt checkpoint must be visible to whoever restarts a crashed run.
    import logging
    import warnings

    from exporter.checkpoint import CheckpointWarning

    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("exporter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CheckpointWarning)
            warnings.showwarning = lambda m, c, f, l, file=None, line=None: err.write(f"{c.__name__}: {m}\n")
            result = api.train(
                args.model,
                args.ckpt_dir,
                args.steps,
                every=args.every,
                keep=args.keep,
                keep_every=args.keep_every,
                framework=args.framework,
                seed=args.seed,
                batch_size=args.batch_size,
                dataset_size=args.dataset_size,
                lr=args.lr,
                nproc=args.nproc,
                strategy=args.strategy,
                devices=args.devices,
            )
    finally:
        logger.removeHandler(handler)
    d = result.to_dict()
    if args.json:
        _print_json(d, out)
    else:
        resumed = f", resumed from {d.get('resumed_from')}" if d.get("resumed_from") else ""
        out.write(
            f"{d.get('model')} ({d.get('framework')}): step {d.get('start_step')} -> {d.get('final_step')} of {d.get('steps')}"
            f"{resumed}; loss {d.get('loss')}; last checkpoint {d.get('checkpoint')}\n"
        )
    return EXIT_OK if result else EXIT_FAIL


_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "list": _cmd_list,
    "inspect": _cmd_inspect,
    "export": _cmd_export,
    "explain": _cmd_explain,
    "verify": _cmd_verify,
    "report": _cmd_report,
    "convert": _cmd_convert,
    "train": _cmd_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 parity failure, 2 bad usage/input)."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # argparse: --help/--version exit 0, errors exit 2
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        registries = getattr(args, "registry", None)
        if registries:
            from exporter.models.registry import load_plugins

            load_plugins([m.strip() for r in registries for m in r.split(",") if m.strip()])
        return _COMMANDS[args.command](args, out, err)
    except ExporterError as e:
        if getattr(args, "json", False):
            error = {"error": type(e).__name__, "message": str(e), "problems": list(e.problems), "exit_code": e.exit_code}
            _print_json({"ok": False, "error": error}, out)
        err.write(f"{type(e).__name__}: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
