"""Model size: parameters and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs"]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(
    model: torch.nn.Module, input_size: tuple[int, int], batch: int = 1, device: str | torch.device | None = None
) -> int:
    """MACs of one eval-mode forward at ``input_size`` (convs, matmuls; FLOPs / 2).

    Pass ``device="meta"`` with a model on the meta device to count paper-size
    models without allocating their weights.
    """
    if device is None:  # where the model lives (meta for a model built on the meta device)
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, 3, *input_size, device=device)
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return int(fc.get_total_flops() // 2)
