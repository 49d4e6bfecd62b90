"""Baseline multi-task CNN: a small strided encoder, an FPN-style neck to 1/4,
and one conv head per task. It is the reference the teachers and students are
measured against, and the model of the thin end-to-end pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgemt.models.backbones import ConvEncoder, conv_bn_act
from edgemt.models.registry import MultiTaskModel, register_model
from edgemt.tasks import Task

__all__ = ["BaselineMTL", "baseline_xs", "baseline_s", "baseline_m", "baseline_l"]


class BaselineMTL(MultiTaskModel):
    """Encoder (strides 2, 4, 8, 16) -> top-down neck at 1/4 -> per-task heads.

    Args:
        tasks: resolved task entries.
        width: channels of the first stage; stages use width x (1, 2, 4, 8).
        depth: conv blocks per stage after the strided one.
        neck: channels of the neck and heads.
        img_size: accepted so every registered model takes the training size; the
            baseline is fully convolutional and runs at any size.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        width: int = 16,
        depth: int = 1,
        neck: int = 32,
        img_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tasks)
        chans = [width, width * 2, width * 4, width * 8]
        self.encoder = ConvEncoder(chans, depth)
        self.laterals = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in chans[1:])
        self.smooth = conv_bn_act(neck, neck)
        self.heads = nn.ModuleDict(
            {t.name: nn.Sequential(conv_bn_act(neck, neck), nn.Conv2d(neck, t.channels, 1)) for t in tasks}
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        # feats at strides 2, 4, 8, 16; the neck fuses 16 -> 8 -> 4.
        y = self.laterals[-1](feats[-1])
        for lat, f in zip(reversed(self.laterals[:-1]), reversed(feats[1:-1])):
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False) + lat(f)
        return self.smooth(y)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.forward_features(x)
        size = x.shape[-2:]
        return {
            name: F.interpolate(head(y), size=size, mode="bilinear", align_corners=False)
            for name, head in self.heads.items()
        }


@register_model
def baseline_xs(*, tasks: Sequence[Task], **kw) -> BaselineMTL:
    return BaselineMTL(tasks, **{"width": 8, "depth": 0, "neck": 16, **kw})


@register_model
def baseline_s(*, tasks: Sequence[Task], **kw) -> BaselineMTL:
    return BaselineMTL(tasks, **{"width": 16, "depth": 1, "neck": 32, **kw})


@register_model
def baseline_m(*, tasks: Sequence[Task], **kw) -> BaselineMTL:
    return BaselineMTL(tasks, **{"width": 24, "depth": 2, "neck": 48, **kw})


@register_model
def baseline_l(*, tasks: Sequence[Task], **kw) -> BaselineMTL:
    return BaselineMTL(tasks, **{"width": 32, "depth": 2, "neck": 64, **kw})
