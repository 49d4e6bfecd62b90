"""SCA-MTL: Sequential Cross Attention based multi-task learning.

Kim, Choi & Min, "Sequential Cross Attention Based Multi-task Learning",
ICIP 2022 (arXiv 2209.02518), built on MTI-Net (Vandenhende et al., ECCV 2020).

From the paper (abstract and DESIGN.md section 4):

* **Feature extractor**: HRNet-W18-small-v2 (4 scales, 1/4..1/32, 18/36/72/144
  channels), each scale followed by a 2-block Swin stage (self-attention for
  long-range dependencies) whose output is concatenated to the HRNet feature:
  36/72/144/288 channels.
* **Per scale, coarsest first** (MTI-Net's order): per-task initial features
  and initial predictions (deep supervision), then the cross-task attention
  module (CTAM), then MTI-Net's feature propagation module (FPM) to the next
  finer scale.
* **CTAM**: for task t, one attention per other task t' (queries from t,
  keys/values from t'); the attended features are concatenated, reduced by a
  1x1 conv and added to t's feature.
* **CSAM** (per task, after CTAM): finer scales query coarser scales; the
  results are concatenated at 1/4, fused by a 1x1 conv, predicted at 1/4 and
  upsampled to the input.

From MTI-Net's public code (facts, re-implemented here):

* Initial task prediction at scale s: the backbone feature, concatenated with
  the task's propagated feature from scale s+1 (bilinear x2) when s < 3, goes
  through two ResNet BasicBlocks (the first with a 1x1 conv-BN shortcut when
  the width changes) to the scale's width; a 1x1 conv gives the prediction.
* FPM: concatenate the N task features (N*C), a non-linear function
  (BasicBlock N*C -> N*C/4, BasicBlock, 1x1 conv -> N*C) gives a softmax mask
  over the tasks, the masked features are reduced by a BasicBlock to C, and each
  task adds a squeeze-and-excitation (r=16) of that shared feature to its own.
  MTI-Net's code reshapes the mask as ``(B, C, N, H, W)``, which groups N
  adjacent channels rather than the N tasks; here the softmax runs over the
  task axis as the paper describes.
* Deep supervision (MTI-Net's loss): every initial prediction is upsampled to
  the label size and weighted like the task's final loss; summed over scales.
* Final head at 1/4: MTI-Net's HRNet head (concatenate all scales at 1/4,
  1x1 conv-BN-ReLU of width ``sum(channels)``, 1x1 conv to the outputs).
  SCA-MTL's CSAM outputs replace MTI-Net's per-scale PAD-Net distillation.
* Sizes: MTI-Net's protocol trains NYUD-v2 at 480x640 and PASCAL-Context at
  512x512; the paper-size variants use those as their ``img_size``.

Reconstructed (the ICIP text is not available here; each is a config field):

* **Attention** is multi-head scaled dot-product attention
  (``F.scaled_dot_product_attention``) with 1x1 conv projections, no norm
  (the BN of the following 1x1 reduction normalises), ``head_dim`` channels
  per head (32, Swin's default). Queries keep their full resolution; keys and
  values are average-pooled to 1/``kv_reduction`` of the input (default 32,
  the coarsest HRNet grid; PVT-style spatial reduction), so the cost of every
  attention is linear in the query map: at 480x640 a 1/4 query map of 19 200
  tokens attends to 300 keys. A map coarser than 1/``kv_reduction`` is used as is.
* **CTAM** keeps one attention (own projections) per ordered task pair; a
  task's T-1 pair attentions run as one batched call (see :class:`CTAM`),
  which cut the 5-task ONNX export time about 3x.
* **CSAM**: for scale s < 3 and each coarser scale s' > s, an attention with
  queries from scale s and keys/values from s' (projected to s's width); the
  results are concatenated, reduced by a 1x1 conv-BN and added to scale s's
  feature. The four scales (the coarsest unchanged) are then upsampled to 1/4,
  concatenated and fused as above.
* **Swin stage**: pre-norm window attention with Swin's relative position
  bias and MLP (ratio 4), ``window`` tokens a side (7), the second block
  shifted by half a window (Swin's -100 mask between regions). Maps are
  zero-padded to window multiples as in Swin; a map smaller than the window
  uses one window of its own size and no shift (Swin's rule).
  ``tests/test_scamtl.py`` checks it equals timm's ``SwinTransformerBlock``.
* **Tiny variant**: instead of HRNet, a 4-scale strided CNN (widths 4/8/12/16)
  so that a training step runs on a CPU; everything after it is the same.

Deep supervision outputs: in training mode ``forward`` stores the initial
predictions in ``last_aux`` as ``{f"{task}@scale{s}": raw}`` with s = 0 (1/4)
to 3 (1/32), each at its scale's resolution (``edgemt.tasks.task_loss``
upsamples to the label). ``extra_losses()`` returns nothing because the labels
are not known to the model; the trainer adds
``model.deep_supervision_loss(batch, weights)`` (MTI-Net's weighting) to the loss.
In eval mode no initial predictions are computed, so exported graphs hold
only the final outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from edgemt.errors import ConfigError, DataError
from edgemt.models.backbones import create_timm_backbone, load_backbone_weights
from edgemt.models.registry import MultiTaskModel, register_model
from edgemt.tasks import Task, task_loss

__all__ = [
    "NYUD_SIZE",
    "PASCAL_SIZE",
    "SwinStage",
    "CrossAttention",
    "CTAM",
    "CSAM",
    "FPM",
    "SCAMTL",
    "scamtl_hrnet18_nyud",
    "scamtl_hrnet18_pascal",
    "scamtl_tiny",
]

NYUD_SIZE = (480, 640)  # MTI-Net's NYUD-v2 protocol
PASCAL_SIZE = (512, 512)  # MTI-Net's PASCAL-Context protocol
_SWIN_MASK = -100.0  # Swin's additive logit for pairs from different shifted regions


def _num_heads(dim: int, head_dim: int) -> int:
    """The largest head count <= dim // head_dim that divides ``dim``."""
    h = max(1, dim // head_dim)
    while dim % h:
        h -= 1
    return h


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _BasicBlock(nn.Module):
    """ResNet BasicBlock; a 1x1 conv-BN shortcut when the width changes (as in MTI-Net)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class _SEBlock(nn.Module):
    """Squeeze-and-excitation: channel gates from the global mean."""

    def __init__(self, channels: int, r: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // r)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


# --------------------------------------------------------------------------- Swin stage


class _SwinBlock(nn.Module):
    """One Swin block on an NHWC map: (shifted) window attention + MLP, pre-norm."""

    def __init__(self, dim: int, heads: int, window: int, shift: bool, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, int(window), shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # One learned bias per head and relative offset inside a window (Swin).
        self.rel_bias = nn.Parameter(torch.zeros((2 * self.window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)

    def _bias(self, wh: int, ww: int, device: torch.device) -> torch.Tensor:
        """Relative position bias ``(heads, N, N)`` of a ``wh x ww`` window (built from static sizes)."""
        ys = torch.arange(wh, device=device).repeat_interleave(ww)
        xs = torch.arange(ww, device=device).repeat(wh)
        dy = ys[:, None] - ys[None, :] + self.window - 1
        dx = xs[:, None] - xs[None, :] + self.window - 1
        idx = dy * (2 * self.window - 1) + dx
        return self.rel_bias[idx.reshape(-1)].reshape(wh * ww, wh * ww, self.heads).permute(2, 0, 1)

    @staticmethod
    def _shift_mask(hp: int, wp: int, wh: int, ww: int, sh: int, sw: int, device: torch.device) -> torch.Tensor:
        """Swin's mask ``(nW, 1, N, N)``: 0 within a region of the rolled map, -100 across regions."""

        def regions(n: int, win: int, shift: int) -> torch.Tensor:
            i = torch.arange(n, device=device)
            if shift == 0:
                return torch.zeros_like(i)
            return (i >= n - win).long() + (i >= n - shift).long()

        ids = regions(hp, wh, sh)[:, None] * 3 + regions(wp, ww, sw)[None, :]  # (hp, wp)
        ids = ids.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        same = ids[:, :, None] == ids[:, None, :]
        zero = torch.zeros((), device=device)
        return torch.where(same, zero, torch.full((), _SWIN_MASK, device=device))[:, None]

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        # A map smaller than the window uses one window of its own size and no shift (Swin's rule).
        wh, ww = min(self.window, h), min(self.window, w)
        sh = wh // 2 if self.shift and h > self.window else 0
        sw = ww // 2 if self.shift and w > self.window else 0
        ph, pw = (-h) % wh, (-w) % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))  # zero padding, as Swin does
        hp, wp = h + ph, w + pw
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        n = wh * ww
        win = x.reshape(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, n, c)
        n_win = win.shape[1]
        # (3, B, nW*heads, N, d): windows and heads share one axis because the ONNX
        # exporter only takes 4-D attention; the mask then broadcasts over the batch.
        qkv = self.qkv(win).reshape(b, n_win, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        qkv = qkv.reshape(3, b, n_win * self.heads, n, c // self.heads)
        mask = self._bias(wh, ww, x.device)[None]  # (1, heads, N, N)
        if sh or sw:
            mask = mask + self._shift_mask(hp, wp, wh, ww, sh, sw, x.device)  # (nW, heads, N, N)
        mask = mask.expand(n_win, self.heads, n, n).reshape(n_win * self.heads, n, n)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask.to(x.dtype))
        out = out.reshape(b, n_win, self.heads, n, c // self.heads).transpose(2, 3).reshape(b, n_win, n, c)
        out = self.proj(out)  # (B, nW, N, C)
        out = out.reshape(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    """Swin blocks (W-MSA, then SW-MSA, ...) on an NCHW map; same shape out.

    Args:
        dim: channels of the map.
        heads: attention heads (must divide ``dim``).
        window: window side in tokens.
        depth: blocks; odd-numbered ones (1-based even) use shifted windows.
    """

    def __init__(self, dim: int, heads: int, window: int = 7, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_SwinBlock(dim, heads, window, shift=i % 2 == 1) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            y = blk(y)
        return y.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- attention modules


class CrossAttention(nn.Module):
    """Multi-head attention of a query map over a (pooled) key/value map, NCHW.

    Args:
        q_dim: channels of the query map (and of the output).
        kv_dim: channels of the key/value map (projected to ``q_dim``).
        heads: attention heads (must divide ``q_dim``).
        kv_pool: average-pool factor applied to the key/value map first
            (spatial reduction; 1 = none). Clipped to the map's size.
    """

    def __init__(self, q_dim: int, kv_dim: int, heads: int, kv_pool: int = 1) -> None:
        super().__init__()
        self.heads, self.kv_pool = heads, int(kv_pool)
        self.q = nn.Conv2d(q_dim, q_dim, 1)
        self.kv = nn.Conv2d(kv_dim, 2 * q_dim, 1)
        self.proj = nn.Conv2d(q_dim, q_dim, 1)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor) -> torch.Tensor:
        b, c, h, w = xq.shape
        kh, kw = min(self.kv_pool, xkv.shape[-2]), min(self.kv_pool, xkv.shape[-1])
        if kh > 1 or kw > 1:
            xkv = F.avg_pool2d(xkv, (kh, kw), (kh, kw))
        d = c // self.heads
        q = self.q(xq).reshape(b, self.heads, d, h * w).transpose(2, 3)  # (B, h, Nq, d)
        k, v = self.kv(xkv).flatten(2).reshape(b, 2, self.heads, d, -1).transpose(3, 4).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Nq, d)
        return self.proj(out.transpose(2, 3).reshape(b, c, h, w))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class CTAM(nn.Module):
    """Cross-task attention at one scale.

    For task t: ``F_t + BN(conv1x1(concat_{t' != t} Attn_{t,t'}(q=F_t, kv=F_t')))``,
    with its own projections for every ordered pair (t, t'). The T-1
    attentions of a task run as one ``scaled_dot_product_attention`` call
    whose heads are the pairs' heads side by side (the same arithmetic as
    separate calls; a quarter of the graph nodes for 5 tasks): task t's query
    projections are one 1x1 conv to ``(T-1)*dim``, a source task's key/value
    projections one 1x1 conv to ``(T-1)*2*dim`` (it is pooled once), and the
    pairs' output projections one grouped 1x1 conv. With a single task it is
    the identity.
    """

    def __init__(self, task_names: Sequence[str], dim: int, heads: int, kv_pool: int = 1) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.dim, self.heads, self.kv_pool = dim, heads, int(kv_pool)
        m = len(self.task_names) - 1
        if m == 0:
            return
        self.q = nn.ModuleDict({t: nn.Conv2d(dim, m * dim, 1) for t in self.task_names})
        self.kv = nn.ModuleDict({u: nn.Conv2d(dim, m * 2 * dim, 1) for u in self.task_names})
        self.proj = nn.ModuleDict({t: nn.Conv2d(m * dim, m * dim, 1, groups=m) for t in self.task_names})
        self.reduce = nn.ModuleDict({t: _conv_bn(m * dim, dim) for t in self.task_names})

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = self.task_names
        if len(names) == 1:
            return dict(feats)
        m, c, heads = len(names) - 1, self.dim, self.heads
        d = c // heads
        kv = {}
        for u in names:
            f = feats[u]
            kh, kw = min(self.kv_pool, f.shape[-2]), min(self.kv_pool, f.shape[-1])
            if kh > 1 or kw > 1:
                f = F.avg_pool2d(f, (kh, kw), (kh, kw))
            # (B, m targets, 2 (k/v), heads, Nk, d)
            kv[u] = self.kv[u](f).flatten(2).reshape(f.shape[0], m, 2, heads, d, -1).transpose(4, 5)
        out = {}
        for t in names:
            b, _, h, w = feats[t].shape
            q = self.q[t](feats[t]).reshape(b, m * heads, d, h * w).transpose(2, 3)  # pairs' heads side by side
            # Source u's slot for target t: t's index among the tasks other than u.
            pairs = [kv[u][:, [x for x in names if x != u].index(t)] for u in names if u != t]
            k = torch.cat([p[:, 0] for p in pairs], dim=1)  # (B, m*heads, Nk, d)
            v = torch.cat([p[:, 1] for p in pairs], dim=1)
            att = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, m * c, h, w)
            out[t] = feats[t] + self.reduce[t](self.proj[t](att))
        return out


class CSAM(nn.Module):
    """Cross-scale attention for one task, then MTI-Net's HRNet head at 1/4.

    For scale s < S-1: ``G_s = F_s + BN(conv1x1(concat_{s' > s} Attn(q=F_s, kv=F_s')))``;
    the coarsest scale passes unchanged. All ``G_s`` are upsampled to the
    finest scale, concatenated, fused (1x1 conv-BN-ReLU) and predicted (1x1 conv).

    Args:
        channels: widths of the scales, finest first.
        heads: attention heads per scale.
        kv_pools: pool factor of each scale's map when it serves as keys/values.
        head_channels: width of the fused 1/4 feature.
        out_channels: the task's output channels.
    """

    def __init__(
        self,
        channels: Sequence[int],
        heads: Sequence[int],
        kv_pools: Sequence[int],
        head_channels: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        s_n = len(channels)
        self.attn = nn.ModuleList(
            nn.ModuleList(CrossAttention(channels[s], channels[c], heads[s], kv_pools[c]) for c in range(s + 1, s_n))
            for s in range(s_n)
        )
        self.reduce = nn.ModuleList(_conv_bn((s_n - 1 - s) * channels[s], channels[s]) for s in range(s_n - 1))
        self.fuse = nn.Sequential(
            nn.Conv2d(sum(channels), head_channels, 1, bias=False), nn.BatchNorm2d(head_channels), nn.ReLU()
        )
        self.pred = nn.Conv2d(head_channels, out_channels, 1)

    def attend(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each finer scale enriched with what it attends to in every coarser scale."""
        out = []
        for s, f in enumerate(feats):
            if s == len(feats) - 1:
                out.append(f)
                continue
            attended = [attn(f, feats[c]) for attn, c in zip(self.attn[s], range(s + 1, len(feats)))]
            out.append(f + self.reduce[s](torch.cat(attended, dim=1)))
        return out

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        g = self.attend(feats)
        return self.pred(self.fuse(torch.cat([_resize(x, size) for x in g], dim=1)))


class FPM(nn.Module):
    """MTI-Net's feature propagation module at one scale (softmax over tasks; see module docstring)."""

    def __init__(self, task_names: Sequence[str], channels: int, se_reduction: int = 16) -> None:
        super().__init__()
        self.task_names = list(task_names)
        n = len(self.task_names)
        shared = n * channels
        self.non_linear = nn.Sequential(
            _BasicBlock(shared, shared // 4), _BasicBlock(shared // 4, shared // 4), nn.Conv2d(shared // 4, shared, 1)
        )
        self.dim_reduction = _BasicBlock(shared, channels)
        self.se = nn.ModuleDict({t: _SEBlock(channels, se_reduction) for t in self.task_names})

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        concat = torch.cat([feats[t] for t in self.task_names], dim=1)
        b, c, h, w = concat.shape
        n = len(self.task_names)
        # Per-position attention over the tasks' features, per channel.
        mask = self.non_linear(concat).reshape(b, n, c // n, h, w).softmax(dim=1)
        shared = self.dim_reduction((mask * concat.reshape(b, n, c // n, h, w)).reshape(b, c, h, w))
        return {t: self.se[t](shared) + feats[t] for t in self.task_names}


class _InitialPrediction(nn.Module):
    """MTI-Net's per-task refinement (2 BasicBlocks) and initial prediction (1x1 conv) at one scale."""

    def __init__(self, tasks: Sequence[Task], cin: int, cout: int) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.refine = nn.ModuleDict(
            {t.name: nn.Sequential(_BasicBlock(cin, cout), _BasicBlock(cout, cout)) for t in tasks}
        )
        self.decode = nn.ModuleDict({t.name: nn.Conv2d(cout, t.channels, 1) for t in tasks})

    def forward(
        self, x: torch.Tensor, prev: Mapping[str, torch.Tensor] | None, predict: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        feats, preds = {}, {}
        for t in self.task_names:
            inp = x if prev is None else torch.cat([x, _resize(prev[t], x.shape[-2:])], dim=1)
            feats[t] = self.refine[t](inp)
            if predict:
                preds[t] = self.decode[t](feats[t])
        return feats, preds


# --------------------------------------------------------------------------- backbones


class _TinyPyramid(nn.Module):
    """A 4-scale strided CNN (1/4..1/32) standing in for HRNet in the CPU-sized variant."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        c0 = channels[0]
        stages = [nn.Sequential(cbr(3, c0, 2), cbr(c0, c0, 2))]
        stages += [
            nn.Sequential(cbr(channels[i - 1], channels[i], 2), cbr(channels[i], channels[i], 1)) for i in (1, 2, 3)
        ]
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _load_hrnet_weights(backbone: nn.Module, name: str, path: str) -> None:
    """Load a local HRNet checkpoint saved either from the feature model or from timm's classifier.

    A classifier checkpoint (timm's ImageNet layout) carries extra head modules
    (``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``);
    it must match the full classifier strictly, and its backbone part is copied.

    Raises:
        DataError: the file is missing, unreadable, or matches neither layout.
    """
    try:
        load_backbone_weights(backbone, path)
        return
    except DataError as first:
        error = first
    full = timm.create_model(name, pretrained=False)
    try:
        load_backbone_weights(full, path)
    except DataError:
        raise error from None
    own = backbone.state_dict()
    backbone.load_state_dict({k: v for k, v in full.state_dict().items() if k in own}, strict=True)


# --------------------------------------------------------------------------- model


class SCAMTL(MultiTaskModel):
    """SCA-MTL (see the module docstring for what is from the paper and what is reconstructed).

    Args:
        tasks: resolved task entries.
        backbone: a timm HRNet name (``hrnet_w18_small_v2``) or ``"tiny"``.
        pretrained_path: local HRNet weights (feature-model or timm classifier layout).
        tiny_channels: widths of the tiny CNN's four scales (``backbone="tiny"``).
        window: Swin window side in tokens.
        swin_depth: Swin blocks per scale (the paper: 2).
        head_dim: channels per attention head (Swin stages, CTAM and CSAM).
        kv_reduction: keys/values are pooled to 1/``kv_reduction`` of the input.
        head_channels: width of the fused 1/4 feature (default ``sum(channels)``, MTI-Net's head).
        img_size: the training resolution ``(H, W)``; divisible by 32. The
            model runs at any size divisible by 32; this one is recorded for
            profiling and export.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        backbone: str = "hrnet_w18_small_v2",
        pretrained_path: str | None = None,
        tiny_channels: Sequence[int] = (4, 8, 12, 16),
        window: int = 7,
        swin_depth: int = 2,
        head_dim: int = 32,
        kv_reduction: int = 32,
        head_channels: int | None = None,
        img_size: Sequence[int] = NYUD_SIZE,
    ) -> None:
        super().__init__(tasks)
        h, w = (int(v) for v in img_size)
        if h % 32 or w % 32:
            raise ConfigError(f"img_size {h}x{w}: both sides must be divisible by 32 (the 1/32 scale)")
        if window < 1 or swin_depth < 0 or head_dim < 1 or kv_reduction < 1:
            raise ConfigError("window, head_dim and kv_reduction must be >= 1 and swin_depth >= 0")
        self.img_size = (h, w)
        if backbone == "tiny":
            if pretrained_path:
                raise ConfigError("backbone 'tiny' has no pretrained weights; drop pretrained_path")
            if len(tiny_channels) != 4:
                raise ConfigError(f"tiny_channels needs 4 widths, got {list(tiny_channels)}")
            self.backbone: nn.Module = _TinyPyramid(tiny_channels)
            base = list(tiny_channels)
        else:
            if not backbone.startswith("hrnet"):
                raise ConfigError(f"backbone {backbone!r}: expected a timm HRNet name or 'tiny'")
            # feature_location='' returns HRNet's own branches (18/36/72/144 for W18);
            # timm's default 'incre' would add the classifier's widening modules (128..1024).
            self.backbone = create_timm_backbone(
                backbone, features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
            )
            if pretrained_path:
                _load_hrnet_weights(self.backbone, backbone, pretrained_path)
            base = list(self.backbone.feature_info.channels())
        reductions = [4, 8, 16, 32]
        self.swin = nn.ModuleList(SwinStage(c, _num_heads(c, head_dim), window, swin_depth) for c in base)
        chans = [2 * c for c in base]  # HRNet feature ++ Swin output
        heads = [_num_heads(c, head_dim) for c in chans]
        kv_pools = [max(1, kv_reduction // r) for r in reductions]
        self.channels = chans
        n_scales = len(chans)
        self.initial = nn.ModuleList(
            _InitialPrediction(tasks, chans[s] + (chans[s + 1] if s < n_scales - 1 else 0), chans[s])
            for s in range(n_scales)
        )
        self.ctam = nn.ModuleList(CTAM(self.task_names, chans[s], heads[s], kv_pools[s]) for s in range(n_scales))
        # FPM from scale s (1..3) to s-1; stored at index s-1.
        self.fpm = nn.ModuleList(FPM(self.task_names, chans[s]) for s in range(1, n_scales))
        hc = int(head_channels or sum(chans))
        self.csam = nn.ModuleDict({t.name: CSAM(chans, heads, kv_pools, hc, t.channels) for t in tasks})
        self.last_aux: dict[str, torch.Tensor] = {}

    def forward_scales(self, x: torch.Tensor) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Per-scale task features after CTAM (finest first) and the initial predictions (training only)."""
        feats = [torch.cat([f, swin(f)], dim=1) for f, swin in zip(self.backbone(x), self.swin)]
        n_scales = len(feats)
        task_feats: list[dict[str, torch.Tensor]] = [{} for _ in range(n_scales)]
        aux: dict[str, torch.Tensor] = {}
        prev = None
        for s in reversed(range(n_scales)):  # coarsest first, as in MTI-Net
            init, preds = self.initial[s](feats[s], prev, predict=self.training)
            for t, p in preds.items():
                aux[f"{t}@scale{s}"] = p
            task_feats[s] = self.ctam[s](init)
            if s > 0:
                prev = self.fpm[s - 1](task_feats[s])
        return task_feats, aux

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        task_feats, aux = self.forward_scales(x)
        self.last_aux = aux
        size = x.shape[-2:]
        return {t: _resize(self.csam[t]([f[t] for f in task_feats]), size) for t in self.task_names}

    def aux_outputs(self) -> dict[str, torch.Tensor]:
        """Initial predictions of the last training forward, ``{f"{task}@scale{s}": raw}`` (s=0 is 1/4)."""
        return dict(self.last_aux)

    def deep_supervision_loss(
        self, batch: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
    ) -> torch.Tensor:
        """MTI-Net's deep supervision: sum over tasks and scales of ``w_t * task_loss(initial prediction)``.

        Args:
            batch: labels by task name (as the datasets return them); tasks
                without a label are skipped.
            weights: per-task weights; default each task's ``loss_weight``.

        Raises:
            RuntimeError: the last forward was not in training mode.
        """
        if not self.last_aux:
            raise RuntimeError("no initial predictions: call deep_supervision_loss after a training-mode forward")
        total = None
        for task in self.tasks:
            if task.name not in batch:
                continue
            w = float((weights or {}).get(task.name, task.loss_weight))
            for s in range(len(self.channels)):
                term = w * task_loss(task, self.last_aux[f"{task.name}@scale{s}"], batch[task.name])
                total = term if total is None else total + term
        if total is None:
            return next(iter(self.last_aux.values())).sum() * 0.0
        return total

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """None: deep supervision needs the labels, see :meth:`deep_supervision_loss`."""
        return {}


# --------------------------------------------------------------------------- variants


@register_model
def scamtl_hrnet18_nyud(*, tasks: Sequence[Task], img_size: Sequence[int] = NYUD_SIZE, **kw) -> SCAMTL:
    """Paper size: HRNet-W18-small-v2 + Swin stages, NYUD-v2 at 480x640."""
    return SCAMTL(tasks, img_size=img_size, **kw)


@register_model
def scamtl_hrnet18_pascal(*, tasks: Sequence[Task], img_size: Sequence[int] = PASCAL_SIZE, **kw) -> SCAMTL:
    """Paper size: HRNet-W18-small-v2 + Swin stages, PASCAL-Context at 512x512."""
    return SCAMTL(tasks, img_size=img_size, **kw)


@register_model
def scamtl_tiny(*, tasks: Sequence[Task], img_size: Sequence[int] = (64, 96), **kw) -> SCAMTL:
    """CPU-sized: a 4-scale CNN (4/8/12/16) instead of HRNet, window 4, 8-channel heads, head width 32."""
    cfg = {
        "backbone": "tiny",
        "tiny_channels": (4, 8, 12, 16),
        "window": 4,
        "head_dim": 8,
        "kv_reduction": 16,
        "head_channels": 32,
        **kw,
    }
    return SCAMTL(tasks, img_size=img_size, **cfg)
