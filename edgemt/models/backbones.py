"""Backbones from timm, and pretrained weights loaded only from a local file.

Nothing here reaches a hub: ``pretrained=False`` always, and weights come from
a path the user names (timm ``.npz`` for the original ViT release,
``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``).
A missing file or keys that do not match the backbone is a
:class:`~edgemt.errors.DataError` naming the file and the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from edgemt.errors import ConfigError, DataError

__all__ = [
    "VIT_TAPS",
    "ViTBackbone",
    "ConvEncoder",
    "ConvTapBackbone",
    "conv_bn_act",
    "create_timm_backbone",
    "load_backbone_weights",
]

# Blocks whose outputs the MLoRE/TaskExpert decoders read (1-based in the papers:
# ViT-L after blocks 6, 12, 18, 24; ViT-B/S after 3, 6, 9, 12). Stored 0-based.
VIT_TAPS = {
    "vit_large_patch16_384": (5, 11, 17, 23),
    "vit_base_patch16_384": (2, 5, 8, 11),
    "vit_small_patch16_384": (2, 5, 8, 11),
}


def load_backbone_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a local checkpoint into a timm backbone.

    Raises:
        DataError: the file is missing, unreadable, or its keys/shapes do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pretrained backbone file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise DataError(f"{path}: .npz weights are only supported for timm ViTs")
        try:
            model.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError) as e:
            raise DataError(f"{path}: .npz does not match the backbone ({e})") from None
        return
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError and others for bad files
            raise DataError(f"{path}: not a readable weights-only checkpoint ({e})") from None
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    else:
        raise DataError(f"{path}: unsupported weights format {suffix!r}; expected .npz, .safetensors or .pth")
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # Position embeddings are resampled to the backbone's grid (the papers fine-tune at 512 / 448x576).
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if bad_shape or (strict and (missing or unexpected)):
        raise DataError(
            f"{path}: weights do not match the backbone: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(bad_shape)} with other shapes "
            f"(e.g. {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad_shape[:2]]})"
        )
    model.load_state_dict(state, strict=False)


def create_timm_backbone(name: str, *, pretrained_path: str | None = None, **kwargs) -> nn.Module:
    """A timm model built without any download, optionally loaded from a local file."""
    if name not in timm.list_models():
        raise ConfigError(f"unknown timm backbone {name!r}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained_path:
        load_backbone_weights(model, pretrained_path)
    return model


class ViTBackbone(nn.Module):
    """A timm ViT returning the tokens after the tapped blocks as 1/16 feature maps.

    Args:
        name: timm model name, e.g. ``vit_large_patch16_384``.
        img_size: the training resolution ``(H, W)`` (both divisible by 16).
        taps: 0-based block indices; default from :data:`VIT_TAPS`.
        pretrained_path: a local weights file (see :func:`load_backbone_weights`).
        overrides: timm kwargs for tiny variants (``embed_dim``, ``depth``, ``num_heads``).
    """

    def __init__(
        self,
        name: str,
        img_size: Sequence[int],
        taps: Sequence[int] | None = None,
        pretrained_path: str | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        h, w = (int(v) for v in img_size)
        if h % 16 or w % 16:
            raise ConfigError(
                f"img_size {h}x{w}: both sides must be divisible by 16 (pad to {-(-h // 16) * 16}x{-(-w // 16) * 16})"
            )
        self.vit = create_timm_backbone(
            name, pretrained_path=pretrained_path, img_size=(h, w), num_classes=0, dynamic_img_size=True, **overrides
        )
        depth = len(self.vit.blocks)
        if taps is None:
            # The papers' taps for the standard depths; a tiny override of ``depth`` taps its quarters.
            taps = VIT_TAPS.get(name) if "depth" not in overrides else None
            taps = taps or tuple(round(depth * f) - 1 for f in (0.25, 0.5, 0.75, 1.0))
        self.taps = tuple(taps)
        if max(self.taps) >= depth:
            raise ConfigError(f"taps {self.taps}: the backbone has only {depth} blocks")
        self.embed_dim = self.vit.embed_dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.vit.forward_intermediates(x, indices=list(self.taps), output_fmt="NCHW", intermediates_only=True)


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvEncoder(nn.Module):
    """A small strided conv encoder: a stride-2 stem, then stages at strides 2, 4, 8, 16.

    Args:
        widths: channels of the four stages.
        depth: extra 3x3 conv blocks per stage after the (strided) first one.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), depth: int = 1) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.stem = conv_bn_act(3, self.widths[0], 3, 2)
        stages, cin = [], self.widths[0]
        for i, c in enumerate(self.widths):
            blocks = [conv_bn_act(cin, c, 3, 1 if i == 0 else 2)]
            blocks += [conv_bn_act(c, c) for _ in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats


class ConvTapBackbone(nn.Module):
    """:class:`ConvEncoder` whose four stage outputs are resampled to one stride.

    It stands in for the ViT of the tap-based decoders (MLoRE) at CPU scale:
    a ViT trained from scratch on a few hundred small images learns far more
    slowly than convolutions, and at 96x128 its 1/16 grid is only 6x8 tokens.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), depth: int = 1, stride: int = 8) -> None:
        super().__init__()
        if stride not in (4, 8, 16):
            raise ConfigError(f"stride={stride}: expected 4, 8 or 16")
        self.encoder = ConvEncoder(widths, depth)
        self.stride = stride
        self.tap_channels = list(self.encoder.widths)
        self.taps = (0, 1, 2, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_with_fine(x)[0]

    def forward_with_fine(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The resampled taps, and the stride-4 stage output unchanged (for detail skips)."""
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        out = []
        feats = self.encoder(x)
        for f in feats:
            if f.shape[-2] > h:  # finer than the target grid: average the detail into it
                f = F.adaptive_avg_pool2d(f, (h, w))
            elif f.shape[-2] < h:
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            out.append(f)
        return out, feats[1]
