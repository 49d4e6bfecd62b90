"""BatchNorm folding into the preceding convolution, for any model.

Conv -> BN pairs are found by running one forward pass with hooks: a BN whose
input tensor is exactly a conv's output (the same object) is folded into that
conv. Works for timm's ``BatchNormAct2d`` (the BN part is folded; its dropout
and activation are kept) as well as plain ``nn.BatchNorm2d``. The list of
folded pairs is returned and recorded in ``arch.json``, so that
:func:`apply_bn_fold` can replay the same structural change when a folded
model is rebuilt from its artifact, without a forward pass and without pickle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["find_conv_bn_pairs", "apply_bn_fold", "fold_batchnorm"]


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every BN that directly normalises a conv's output."""
    conv_out: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps outputs alive so that no id() is reused during the pass
    pairs: list[tuple[str, str]] = []
    hooks = []

    def on_conv(name):
        def hook(mod, inp, out):
            conv_out[id(out)] = name
            alive.append(out)

        return hook

    def on_bn(name):
        def hook(mod, inp, out):
            src = conv_out.get(id(inp[0]))
            if src is not None:
                pairs.append((src, name))

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv(name)))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            hooks.append(m.register_forward_hook(on_bn(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # A conv called more than once, or feeding two BNs, cannot be folded into one of them.
    seen: dict[str, int] = {}
    for c, _ in pairs:
        seen[c] = seen.get(c, 0) + 1
    return sorted({p for p in pairs if seen[p[0]] == 1})


def _replacement(bn: nn.BatchNorm2d) -> nn.Module:
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)  # timm BatchNormAct2d
    rest = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def apply_bn_fold(model: nn.Module, pairs: Sequence[Sequence[str]]) -> None:
    """Fold each named BN into its conv (eval statistics) and replace the BN module."""
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"cannot fold {bn_name!r} into {conv_name!r}: not a Conv2d/BatchNorm2d pair")
        with torch.no_grad():
            scale = (
                bn.weight / torch.sqrt(bn.running_var + bn.eps)
                if bn.affine
                else 1 / torch.sqrt(bn.running_var + bn.eps)
            )
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = bias * scale + shift
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
            else:
                conv.bias.copy_(new_bias)
        parent_name, _, attr = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, _replacement(bn))


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Fold every conv -> BN pair of ``model`` in place; returns the pairs folded."""
    pairs = find_conv_bn_pairs(model, example)
    apply_bn_fold(model, pairs)
    return pairs
