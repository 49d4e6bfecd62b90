"""Training: the trainer (AMP, DDP via torchrun, checkpoints, exact resume), schedules, stages."""
