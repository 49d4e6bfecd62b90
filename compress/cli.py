"""Registers the compression package's stages and verbs with the core (entry point ``edgemt.plugins``)."""

from __future__ import annotations


def register(reg) -> None:
    from edgemt.cli import stage_command
    from edgemt.pipeline import Stage, lazy_run

    reg.add_stage(
        Stage(
            "student",
            lazy_run("edgemt.compress.stages", "distill_stage"),
            "train the student, distilled from the teacher",
            sections=("data", "student", "distill"),
            produces_model=True,
            needs_model=True,
        )
    )
    reg.add_stage(
        Stage(
            "prune",
            lazy_run("edgemt.compress.stages", "prune_stage"),
            "prune the student to a MACs or latency budget, distilling between steps",
            sections=("data", "prune", "distill"),
            produces_model=True,
            needs_model=True,
        )
    )
    reg.add_stage(
        Stage(
            "reparam",
            lazy_run("edgemt.compress.stages", "reparam_stage"),
            "reparameterize the student for deployment (deploy.form) and fold BatchNorm",
            sections=("data", "deploy"),
            produces_model=True,
            needs_model=True,
        )
    )
    reg.add_stage(
        Stage(
            "qat",
            lazy_run("edgemt.compress.stages", "qat_stage"),
            "int8 quantization-aware training of the reparameterized student (torchao pt2e), distilled",
            sections=("data", "qat", "distill", "deploy"),
            produces_model=True,
            needs_model=True,
        )
    )
    reg.add_command(
        stage_command("distill", "student", "train the recipe's student distilled from its teacher (resumable)")
    )
    reg.add_command(
        stage_command("prune", "prune", "prune the student to prune.macs_ratio / macs / latency_ms (Torch-Pruning)")
    )
    reg.add_command(
        stage_command("qat", "qat", "int8 quantization-aware training of the reparameterized student (distilled)")
    )
    reg.add_command(
        stage_command("reparam", "reparam", "reparameterize the trained student to deploy.form and fold BatchNorm")
    )
