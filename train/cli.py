"""Registers the training package's stages and verbs with the core (entry point ``edgemt.plugins``)."""

from __future__ import annotations


def register(reg) -> None:
    from edgemt.cli import stage_command
    from edgemt.pipeline import Stage, lazy_run

    run = lazy_run("edgemt.train.stages", "train_model_stage")
    reg.add_stage(
        Stage("teacher", run, "train the teacher model", sections=("data", "teacher", "train"), produces_model=True)
    )
    reg.add_command(
        stage_command("train", "teacher", "train the recipe's teacher (the 'teacher' stage; resumes from checkpoints)")
    )
