"""Registers the targets package's stages and verbs with the core (entry point ``edgemt.plugins``)."""

from __future__ import annotations

import argparse


def _with_targets(verb: str, stage: str, help_text: str):
    """A stage verb that also takes ``--targets`` (overrides ``export.targets``)."""
    from edgemt.cli import stage_command

    cmd = stage_command(verb, stage, help_text)
    base_configure, base_run = cmd.configure, cmd.run

    def configure(p: argparse.ArgumentParser) -> None:
        base_configure(p)
        p.add_argument("--targets", nargs="+", metavar="TARGET", help="targets to use (default: the recipe's)")

    def run(args: argparse.Namespace) -> int:
        if args.targets:
            args.overrides.append(f"export.targets=[{', '.join(args.targets)}]")
        return base_run(args)

    cmd.configure, cmd.run = configure, run
    return cmd


def _benchmark_command():
    """``edgemt benchmark RUN``: export to every target, validate each, print one table, write JSON."""
    from edgemt.cli import add_recipe_args, recipe_from_args
    from edgemt.pipeline import Command

    def configure(p: argparse.ArgumentParser) -> None:
        add_recipe_args(p)
        p.add_argument("--targets", nargs="+", metavar="TARGET", help="targets to benchmark (default: all)")
        p.add_argument("--json", metavar="FILE", help="where to write the JSON (default: RUN/benchmark.json)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from edgemt.io import read_json, write_json
        from edgemt.pipeline import run_stage
        from edgemt.targets.registry import TARGETS
        from edgemt.targets.report import benchmark_table

        targets = args.targets or list(TARGETS)  # registry order: ONNX, TFLite, Core ML
        args.overrides.append(f"export.targets=[{', '.join(targets)}]")
        recipe = recipe_from_args(args)
        progress = not args.no_progress
        run_stage(recipe, "export", progress=progress)
        manifest = run_stage(recipe, "validate", progress=progress)
        rows = read_json(recipe.run_dir / "validate" / "results.json")
        model = read_json(Path(read_json(recipe.run_dir / "export" / "manifest.json")["source_dir"]) / "arch.json")
        tasks = [t["name"] for t in model["tasks"]]
        print(benchmark_table(rows, tasks))
        out = Path(args.json) if args.json else recipe.run_dir / "benchmark.json"
        write_json(out, {"run": str(recipe.run_dir), "tasks": tasks, "targets": rows})
        print(f"benchmark: {out}")
        return int(manifest.get("exit_code", 0))

    return Command("benchmark", "export to every target, validate each, print one table and write JSON", configure, run)


def register(reg) -> None:
    from edgemt.cli import stage_command
    from edgemt.pipeline import Stage, lazy_run

    def check_targets(recipe) -> None:
        from edgemt.targets.registry import get_target

        for name in recipe.export.targets:
            get_target(name)

    reg.add_stage(
        Stage(
            "export",
            lazy_run("edgemt.targets.stages", "export_stage"),
            "export the model to every target",
            sections=("data", "export", "deploy"),
            needs_model=True,
            check=check_targets,
        )
    )
    reg.add_stage(
        Stage(
            "validate",
            lazy_run("edgemt.targets.stages", "validate_stage"),
            "accuracy, parity and latency per target",
            sections=("data", "validate"),
        )
    )
    reg.add_stage(
        Stage(
            "report",
            lazy_run("edgemt.targets.stages", "report_stage"),
            "write report.md and report.json",
            sections=("data", "validate", "export"),
        )
    )
    reg.add_command(_with_targets("export", "export", "export the latest model stage to the recipe's targets"))
    reg.add_command(
        _with_targets("validate", "validate", "validate every exported target (exit 1 when a target misses its gate)")
    )
    reg.add_command(stage_command("report", "report", "write the run's report (Markdown + JSON)"))
    reg.add_command(_benchmark_command())
