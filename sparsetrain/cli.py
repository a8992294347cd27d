"""``sparsetrain train|eval|report|export|compare|methods``: the command line (argparse only here).

Every error a user can fix (bad config, unknown name, missing data, corrupt checkpoint) ends the
program with one line ``sparsetrain: error: <message>`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from sparsetrain.errors import CheckpointError, SparsetrainError
from sparsetrain.train.signals import TrainingInterrupted

__all__ = ["main"]

log = logging.getLogger("sparsetrain")


def _with_dirs(config, data_dir: str | None = None, out: str | None = None):  # noqa: ANN001, ANN202
    """Apply --data-dir / --out verbatim (a path is never parsed as YAML)."""
    if data_dir is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, dir=data_dir))
    if out is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out=out))
    return config


def _read_run(path: str, data_dir: str | None = None):  # noqa: ANN202
    """Checkpoint and its config."""
    from sparsetrain.train.checkpoint import load_checkpoint
    from sparsetrain.train.config import config_from_dict

    checkpoint = load_checkpoint(path)
    config = _with_dirs(config_from_dict(checkpoint["config"], f" in checkpoint {path}"), data_dir)
    return checkpoint, config


def _subnet_arg(text: str) -> int | float:
    """``--subnet``: an index (``2``) or a sparsity (``0.9``)."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an index or a sparsity: {text!r}") from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def _pick_subnet(checkpoint: dict, subnet: int | float | None) -> dict:
    """The checkpoint of one AST sub-network (plain model keys); others pass through."""
    if subnet is None and checkpoint["sparsifier"].get("method") != "ast":
        return checkpoint
    from sparsetrain.methods.ast.checkpoint import subnet_checkpoint

    return subnet_checkpoint(checkpoint, subnet)


def _load_run(path: str, data_dir: str | None = None, subnet: int | float | None = None):  # noqa: ANN202
    """Checkpoint (of sub-network ``subnet`` for AST), its config and its trained model."""
    checkpoint, config = _read_run(path, data_dir)
    checkpoint = _pick_subnet(checkpoint, subnet)
    return checkpoint, config, _build_model(checkpoint, config, path)


def _build_model(checkpoint: dict, config, path: str):  # noqa: ANN001, ANN202
    from sparsetrain.train.builders import build_model_for

    model = build_model_for(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the model in its config ({first})"
        ) from None
    return model


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


def _add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE ...``, repeatable, collected into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help=help,
    )


def _format_extra(key: str, value: object) -> str:
    """Accuracies as percentages and losses to four decimals; anything else as it is."""
    if isinstance(value, float) and key.endswith("_acc"):
        return f"{value:.2%}"
    if isinstance(value, float) and key.endswith("_loss"):
        return f"{value:.4f}"
    return str(value)


def _headline(config, loss: float, acc: float) -> str:  # noqa: ANN001
    """``test accuracy: 91.00% (test loss 0.2500)``; for a language model its validation loss,
    bits per byte and next-byte accuracy."""
    from sparsetrain import tasks
    from sparsetrain.data import dataset_info

    if dataset_info(config.data.name, **config.data.options).task == tasks.LANGUAGE_MODEL:
        bpb = tasks.derived_metrics(tasks.LANGUAGE_MODEL, loss)["bpb"]
        return (
            f"validation loss: {loss:.4f} ({bpb:.3f} bits per byte), next-byte accuracy {acc:.2%}"
        )
    return f"test accuracy: {acc:.2%} (test loss {loss:.4f})"


def _config_file(name_or_path: str | None) -> Path | None:
    """A config given by path, or by the name of a shipped one (``rigl``)."""
    from sparsetrain.configs import find_config

    return None if name_or_path is None else find_config(name_or_path)


def cmd_train(args: argparse.Namespace) -> int:
    from sparsetrain.train.config import load_config
    from sparsetrain.train.entry import train
    from sparsetrain.train.resume import find_resume

    if args.resume is None:
        config = load_config(_config_file(args.config), args.overrides)
        config = _with_dirs(config, args.data_dir, args.out)
        result = train(config, overwrite=args.overwrite)
    else:
        if args.out is not None or args.overwrite:
            raise SparsetrainError(
                f"{'--out' if args.out is not None else '--overwrite'} cannot be combined with "
                "--resume: a run resumes in its own directory"
            )
        point = find_resume(args.resume)
        if args.config is None:  # the checkpoint's own config, with --set on top
            config = point.config(args.overrides)
        else:
            config = load_config(_config_file(args.config), args.overrides)
        result = train(_with_dirs(config, args.data_dir), resume=point)
    if _rank() != 0:
        return 0
    print(f"final {_headline(result.config, result.test_loss, result.test_acc)}")
    for key, value in result.extras.items():
        print(f"{key}: {_format_extra(key, value)}")
    print()
    print(result.report.format())
    print()
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    print(f"plots:         {', '.join(str(p) for p in result.plots)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsetrain.data import load_dataset
    from sparsetrain.train.builders import EVAL_BATCH_SIZE, make_loader
    from sparsetrain.train.epochs import evaluate

    saved, config = _read_run(args.checkpoint, args.data_dir)
    d = config.data
    test_set, _ = load_dataset(d.name, "test", d.dir, **d.options)
    subnets = [args.subnet]
    if args.subnet is None and saved["sparsifier"].get("method") == "ast":
        subnets = list(range(len(saved["sparsifier"]["method_state"]["sparsities"])))
    for subnet in subnets:
        checkpoint = _pick_subnet(saved, subnet)
        model = _build_model(checkpoint, config, args.checkpoint).to(args.device)
        loss, acc = evaluate(model, make_loader(test_set, EVAL_BATCH_SIZE, None, 0))
        masks = checkpoint["sparsifier"]["masks"]
        total = sum(m.numel() for m in masks.values())
        active = sum(int(m.sum()) for m in masks.values())
        sparsity = 1.0 - active / total if total else 0.0
        if subnet is not None:
            print(f"sub-network {subnet}:")
        print(f"{_headline(config, loss, acc)} on {len(test_set):,} {d.name} samples")
        print(f"sparsity: {sparsity:.2%} of {total:,} weights in {len(masks)} sparse tensors")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sparsetrain.data import dataset_info
    from sparsetrain.report import plot_layer_sparsity
    from sparsetrain.report.summary import build_report

    checkpoint, config, model = _load_run(args.checkpoint, subnet=args.subnet)
    state = checkpoint["sparsifier"]
    example = dataset_info(config.data.name, **config.data.options).example_input()
    report = build_report(
        model,
        state["masks"],
        state["targets"],
        example,
        density_sum=state.get("density_sum"),
        steps=state["step"],
        batch_size=config.train.batch_size,
    )
    print(report.format())
    if report.sparsity.rows:
        out = args.output or Path(args.checkpoint).parent / "layer_sparsity.png"
        print(f"plot: {plot_layer_sparsity(report, out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from sparsetrain.data import dataset_info
    from sparsetrain.export import bake, export_model

    checkpoint, config, model = _load_run(args.checkpoint, subnet=args.subnet)
    info = dataset_info(config.data.name, **config.data.options)
    example = info.example_input(8, generator=torch.Generator().manual_seed(0))
    options = {"batch_size": args.batch_size} if args.format == "sparse-cpu" else {}
    masks = checkpoint["sparsifier"]["masks"]
    semi = args.format == "semi-structured"  # GPU tensors: checked here, saved as 2:4 weights
    with logging_redirect_tqdm([log]):  # the per-layer log lines print above the timing bar
        exported = export_model(
            model,
            masks,
            args.format,
            example_input=example,
            path=None if semi else args.output,
            **options,
        )
    decisions = getattr(exported, "export_decisions", {}).values()
    if decisions:
        fast = [d.layer for d in decisions if d.choice == "sparse"]
        kernels = "2:4 kernels" if semi else "CSR kernels"
        names = ", ".join(fast) or "none (dense was as fast)"
        print(f"{len(fast)} of {len(decisions)} sparse layers on {kernels}: {names}")
    if semi:
        torch.save(bake(model, masks).state_dict(), args.output)
        print(
            "semi-structured tensors live in GPU memory: wrote the verified 2:4 weights as a "
            "state_dict; after loading it, export_model(model, None, 'semi-structured') on the "
            "GPU rebuilds them"
        )
    print(f"{args.format} export: {args.output} ({Path(args.output).stat().st_size:,} bytes)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from sparsetrain.methods import get_method, list_methods, method_options

    names = list_methods()
    width = max(map(len, names))
    for name in names:
        cls = get_method(name)
        doc = (inspect.getdoc(cls) or "").splitlines()
        print(f"{name.ljust(width)}  {doc[0] if doc else ''}")
        params = inspect.signature(cls.__init__).parameters
        options = [
            f"{o}={params[o].default!r}" if params[o].default is not inspect.Parameter.empty else o
            for o in method_options(cls)
        ]
        if options:
            print(f"{''.ljust(width)}  options: {', '.join(options)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sparsetrain.compare import load_grid, run_grid, write_summary

    grid = load_grid(
        _config_file(args.config),
        quick=args.quick,
        overrides=args.overrides,
        variants=args.variants.split(",") if args.variants else None,
    )
    out = Path(args.out or ("runs/compare_quick" if args.quick else "runs/compare"))
    if not (args.verbose or args.quiet):  # per-epoch lines of every cell would bury the grid
        logging.getLogger("sparsetrain").setLevel(logging.WARNING)
        logging.getLogger("sparsetrain.compare").setLevel(logging.INFO)
    outcome = run_grid(grid, out, jobs=args.jobs)
    written = write_summary(outcome.records, out, [v.name for v in grid.variants])
    print(f"{len(outcome.ran)} cells run, {len(outcome.skipped)} already done")
    print(f"results: {out / 'results.jsonl'}")
    print(f"summary: {', '.join(str(p) for p in written)}")
    if outcome.failed:
        lines = "; ".join(f"{key}: {error}" for key, error in outcome.failed.items())
        raise SparsetrainError(f"{len(outcome.failed)} cells failed ({lines}); re-run to retry")
    return 0


_SUBNET_HELP = "AST checkpoints: the sub-network, by index (0 = densest) or sparsity"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetrain", description="Sparse training from scratch for PyTorch models."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model from a YAML config")
    p.add_argument(
        "config",
        nargs="?",
        help="YAML config: a path, or the name of a shipped one (rigl, gap, ...; "
        "default: the built-in default run)",
    )
    _add_overrides(p, "override a config key, e.g. --set optimizer.lr=0.1 sparsity.sparsity=0.95")
    p.add_argument("--data-dir", help="dataset directory (sets data.dir)")
    p.add_argument("--out", help="run directory (sets train.out)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run directory that holds another run (deletes that run's "
        "checkpoints, config, metrics and reports first)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR_OR_CKPT",
        help="continue an interrupted run from its newest checkpoint (or the checkpoint given); "
        "a config or --set may change only how it runs (train.device, train.save_every, ...)",
    )
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint written by `sparsetrain train`")
    p.add_argument("--data-dir", help="dataset directory (overrides the checkpoint's data.dir)")
    p.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    p.add_argument("--subnet", type=_subnet_arg, help=_SUBNET_HELP + " (default: every one)")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("report", help="per-layer sparsity and FLOPs of a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint written by `sparsetrain train`")
    p.add_argument(
        "-o", "--output", help="plot file (default: layer_sparsity.png beside the checkpoint)"
    )
    p.add_argument("--subnet", type=_subnet_arg, help=_SUBNET_HELP + " (required for AST)")
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("export", help="export a checkpoint's sparse model to a file")
    p.add_argument("checkpoint", help="a checkpoint written by `sparsetrain train`")
    p.add_argument(
        "--format",
        choices=["dense", "compressed", "sparse-cpu", "semi-structured"],
        default="dense",
        help="dense state_dict, lossless compressed file, CSR kernels on CPU, or 2:4 kernels "
        "on a CUDA GPU (checked there, written as 2:4 weights; default: dense)",
    )
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument(
        "--batch-size", type=int, default=64, help="sparse-cpu: batch size layers are timed at"
    )
    p.add_argument("--subnet", type=_subnet_arg, help=_SUBNET_HELP + " (required for AST)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser(
        "compare", help="train a grid of methods x sparsities x seeds x models; tables, plots"
    )
    p.add_argument("config", help="grid YAML: a path, or compare / compare_gpt (shipped)")
    p.add_argument("--quick", action="store_true", help="the grid file's quick section")
    p.add_argument("--out", help="results directory (default: runs/compare or runs/compare_quick)")
    p.add_argument("--variants", help="only these rows, comma-separated (e.g. gmp,acdc)")
    p.add_argument(
        "--jobs", type=_positive_int, default=1, help="cells trained at once, threads shared out"
    )
    _add_overrides(p, "override a training config key of every cell, e.g. --set train.epochs=1")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("methods", help="list the sparse-training methods and their options")
    p.set_defaults(func=cmd_methods)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0; 2 for a user error; 128 + the signal
    number when SIGTERM/SIGINT stopped training after saving a checkpoint)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args)
    except TrainingInterrupted as stopped:
        if _rank() == 0:
            print(f"sparsetrain: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (SparsetrainError, yaml.YAMLError, FileNotFoundError, PermissionError) as error:
        message = _one_line(error)
    except KeyboardInterrupt:
        print("sparsetrain: interrupted", file=sys.stderr)
        return 130
    print(f"sparsetrain: error: {message}", file=sys.stderr)
    return 2
