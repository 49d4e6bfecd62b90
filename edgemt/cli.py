"""The ``edgemt`` command line: one verb per stage, plus ``pipeline``.

Exit codes: 0 ok, 2 bad input or config (message, no traceback), 1 anything
else (traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import yaml

from edgemt.errors import ConfigError, TrainingDiverged, UserError

__all__ = ["main", "add_recipe_args", "recipe_from_args", "parse_size", "stage_command"]


def parse_size(text: str) -> tuple[int, int]:
    """``"96x128"`` -> ``(96, 128)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 96x128, got {text!r}") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"size {text!r}: each side must be >= 16")
    return h, w


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The options every recipe-driven verb shares."""
    p.add_argument("recipe", help="shipped recipe name (e.g. demo) or path to a recipe YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.steps=200 (VALUE is parsed as YAML); repeatable",
    )
    p.add_argument("--runs-dir", help="directory holding runs/<name>/ (default: the recipe's runs_dir)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def recipe_from_args(args: argparse.Namespace):
    from edgemt.config import load_recipe

    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE such as train.steps=200")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    if args.runs_dir:
        overrides["runs_dir"] = args.runs_dir
    return load_recipe(args.recipe, overrides)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and not os.environ.get("EDGEMT_NO_PROGRESS")


# --------------------------------------------------------------------------- core verbs


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from edgemt.data.synthetic import generate

    out = generate(
        args.out,
        args.train,
        args.val,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=_progress(args),
        workers=args.workers,
    )
    print(f"wrote {args.train} train + {args.val} val scenes to {out}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from edgemt.pipeline import run_pipeline

    recipe = recipe_from_args(args)
    results = run_pipeline(recipe, force=args.force, progress=_progress(args), until=args.until)
    report = recipe.run_dir / "report" / "report.md"
    if "report" in results and report.is_file():
        print(f"report: {report}")
        if report.with_suffix(".html").is_file():
            print(f"report: {report.with_suffix('.html')} (open in a browser)")
    failed = [n for n, m in results.items() if m.get("status") == "failed"]
    return 1 if failed else 0


def _cmd_stage(stage: str):
    def run(args: argparse.Namespace) -> int:
        from edgemt.pipeline import run_stage

        recipe = recipe_from_args(args)
        manifest = run_stage(recipe, stage, force=args.force, progress=_progress(args))
        return int(manifest.get("exit_code", 0))

    return run


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from edgemt.data import build_dataset
    from edgemt.evaluate import evaluate
    from edgemt.models import load_model

    recipe = recipe_from_args(args)
    model_dir = Path(args.model) if args.model else recipe.run_dir / args.stage
    if not (model_dir / "arch.json").is_file():
        raise UserError(f"{model_dir}: no model here (arch.json missing); train it first or pass --model DIR")
    model = load_model(model_dir)
    ds = build_dataset(recipe.data, args.split, train=False)
    metrics = evaluate(model, ds, model.tasks, max_images=args.max_images, progress=_progress(args))
    for task, vals in metrics.items():
        shown = {k: round(v, 4) for k, v in vals.items() if isinstance(v, (int, float))}
        print(f"{task:12s} {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from edgemt.models import list_models

    for name in list_models(args.pattern):
        print(name)
    return 0


def stage_command(verb: str, stage: str, help_text: str):
    """A CLI verb that runs one pipeline stage of a recipe (its parent must be complete)."""
    from edgemt.pipeline import Command

    def configure(p: argparse.ArgumentParser) -> None:
        add_recipe_args(p)
        p.add_argument("--force", action="store_true", help="rerun even if the stage is up to date")

    return Command(verb, help_text, configure, _cmd_stage(stage))


def build_parser() -> argparse.ArgumentParser:
    from edgemt import __version__
    from edgemt.pipeline import registry

    parser = argparse.ArgumentParser(
        prog="edgemt",
        description="Compress multi-task dense-prediction models and export them for phones and Jetson.",
    )
    parser.add_argument("--version", action="version", version=f"edgemt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic scene dataset in the NYUD-v2 layout")
    synth.add_argument("--out", required=True, help="output directory (created)")
    synth.add_argument("--train", type=int, default=400, help="training scenes (default 400)")
    synth.add_argument("--val", type=int, default=100, help="validation scenes (default 100)")
    synth.add_argument("--size", type=parse_size, default=(96, 128), help="HxW (default 96x128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(func=_cmd_data_synth)

    p = sub.add_parser("pipeline", help="run every stage of a recipe, skipping up-to-date ones")
    add_recipe_args(p)
    p.add_argument("--force", nargs="*", default=[], metavar="STAGE", help="rerun these stages (or 'all')")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("eval", help="evaluate a trained model on a split")
    add_recipe_args(p)
    p.add_argument("--stage", default="teacher", help="model stage directory of the run (default teacher)")
    p.add_argument("--model", help="a model directory (arch.json + weights.safetensors) instead of --stage")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_cmd_models)

    for cmd in registry().commands.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"edgemt: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"edgemt: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgemt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment failure: keep the traceback
        traceback.print_exc()
        print(f"edgemt: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
