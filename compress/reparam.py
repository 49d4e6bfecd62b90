"""Reparameterization for deployment: expert-block forms and BatchNorm folding.

``reparameterize(model, form)`` switches every low-rank expert block of a
student (or MLoRE teacher) to a deploy form (see :mod:`edgemt.models.student`)
and folds the remaining conv -> BN pairs, recording both in
``model.deploy_record`` so the saved ``arch.json`` rebuilds the same structure.

* ``dynamic-merge`` and ``factorized`` are exact in eval mode.
* ``frozen-gate`` needs the gates fixed first: :func:`calibrate_gates` sets
  each block's ``frozen_gates`` to the training-set mean of its router's
  output; :func:`freeze_gates` makes the training form use them (for a brief
  fine-tune before folding, see the ``deploy`` stage).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgemt.errors import ConfigError
from edgemt.models.fold import fold_batchnorm
from edgemt.models.student import FORMS

__all__ = ["FORMS", "expert_blocks", "calibrate_gates", "freeze_gates", "reparameterize"]


def expert_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules with deploy forms and routers (those that have ``frozen_gates``)."""
    return [m for m in model.modules() if hasattr(m, "frozen_gates") and hasattr(m, "set_form")]


@torch.no_grad()
def calibrate_gates(
    model: nn.Module, images: Iterable[torch.Tensor], *, max_batches: int = 0, progress: bool = False
) -> list[torch.Tensor]:
    """Set each block's ``frozen_gates`` to the mean router output ``[g, m]`` over ``images``.

    ``images`` yields normalised ``(B, 3, H, W)`` batches. Returns the gates per block, ``(T, E+1)``.
    """
    blocks = expert_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no routed expert blocks to calibrate")
    if any(b.form != "training" for b in blocks):
        raise ConfigError("calibrate_gates needs the training form (calibrate before reparameterizing)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = [torch.zeros_like(b.frozen_gates) for b in blocks]
    n = 0
    for i, x in enumerate(tqdm(images, desc="calibrate gates", disable=not progress, leave=False)):
        if max_batches and i >= max_batches:
            break
        model(x.to(device))
        for s, b in zip(sums, blocks):
            s += torch.stack([b.last_gates[t].sum(0) for t in b.task_names]).to(s)
        n += x.shape[0]
    model.train(was_training)
    if n == 0:
        raise ConfigError("calibrate_gates got no images")
    for s, b in zip(sums, blocks):
        b.frozen_gates.copy_(s / n)
    return [b.frozen_gates.clone() for b in blocks]


def freeze_gates(model: nn.Module, frozen: bool = True) -> None:
    """Make the training form use ``frozen_gates`` instead of the routers (or undo it)."""
    for b in expert_blocks(model):
        if frozen and torch.isnan(b.frozen_gates).any():
            raise ConfigError("freeze_gates: frozen_gates are not set; run calibrate_gates first")
        b.gate_override = b.frozen_gates if frozen else None


def reparameterize(model: nn.Module, form: str, *, input_size: tuple[int, int], fold_bn: bool = True) -> dict[str, Any]:
    """Switch ``model`` (in place, eval mode) to deploy ``form`` and fold BatchNorm.

    Args:
        form: one of :data:`FORMS`.
        input_size: ``(H, W)`` of the example forward that finds the conv -> BN pairs.
        fold_bn: fold every remaining conv -> BN pair into its conv.

    Returns:
        The deploy record (also kept as ``model.deploy_record`` and written to ``arch.json``).
    """
    if form not in FORMS:
        raise ConfigError(f"deploy form {form!r}; expected one of {FORMS}")
    if getattr(model, "deploy_record", None):
        raise ConfigError(f"model is already reparameterized ({model.deploy_record}); start from the trained model")
    model.eval()
    if form != "training":
        if not hasattr(model, "set_form"):
            raise ConfigError(f"{type(model).__name__} has no deploy forms; use form 'training'")
        for b in expert_blocks(model):
            b.gate_override = None
        model.set_form(form)
    pairs: list[tuple[str, str]] = []
    if fold_bn:
        device = next(model.parameters()).device
        pairs = fold_batchnorm(model, torch.zeros(1, 3, *input_size, device=device))
    record = {"form": form, "bn_folded": [list(p) for p in pairs]}
    model.deploy_record = record
    return record
