"""MLoRE: multi-task dense prediction via a mixture of low-rank experts.

Yang, Jiang, Tang, Wang, Zhao, Liu, Li. "Multi-Task Dense Prediction via
Mixture of Low-Rank Experts", CVPR 2024 (arXiv 2403.17749). This is our own
reimplementation, checked detail by detail against the authors' public code
(``models/transformers/MLoRE.py`` / ``MLoRE_repara.py``, ``configs/*``).

Architecture (paper sizes in brackets: ViT-L NYUD-v2 / PASCAL-Context):

* Backbone: a timm ViT (:class:`~edgemt.models.backbones.ViTBackbone`) tapped
  after blocks 6, 12, 18 and the last one (ViT-B/S: 3, 6, 9, 12), every tap a
  1/16 map. The last tap goes through the ViT's final LayerNorm, the others do
  not (as in the official code).
* Per tap: a 1x1 conv shared by the tasks to width C [768 / 452], then two
  stacked :class:`MoEBlock`. The first block reads the shared map for every
  task, the second reads each task's output of the first.
* :class:`MoEBlock`, for task t: ``x_t = conv1x1_t(x)``; a per-image
  :class:`Router` on ``x_t`` gives E expert logits, E noise std-devs and one
  unbounded scalar ``g_mix``; noisy top-k gating keeps k of E [9 of 15]
  (``gating="nyud"``: the dropped logits are set to -1e10 before the softmax;
  ``"pascal"``: softmax first, then the dropped probabilities are zeroed, so
  the kept ones do not sum to 1). Then
  ``y = BN_all_t(sum_i g_i E_i(x_t)) + g_mix S_t(x_t) + G(x_t.detach())`` and
  the block returns ``conv1x1_t(GELU(BN_t(y)))``. ``E_i`` are low-rank experts
  shared by all tasks (kxk conv C -> r_i, then 1x1 conv r_i -> C, no
  nonlinearity; ranks [16, 32, ..., 240 / 16, 24, ..., 128]), ``S_t`` a
  task-specific low-rank expert [rank 16 / 72] and ``G`` a dense 3x3 conv shared
  by the tasks that receives no gradient through its input.
* Per task: the 4 tap outputs are concatenated -> 1x1 conv, BN, GELU, 3x3 conv
  to 4 maps -> softmax over the taps -> weighted sum; x4 bilinear upsampling;
  a head (3x3 conv, BN, GELU, 1x1 conv) at 1/4; bilinear upsampling to the
  input size.
* Load balancing: for every MoE block, the gates of all tasks and images are
  averaged per expert and the squared coefficient of variation
  (``(std / mean) ** 2``, unbiased std) is summed over the 8 blocks, weighted
  by ``load_balance_weight`` [5e-4 / 3e-4; ViT-B/S PASCAL 1e-4].

Inference forms of every MoE block (:meth:`MLoRE.set_form`; the merged forms
need eval mode because they fold BatchNorm running statistics):

* ``"training"``: the structure above, every expert evaluated separately.
* ``"dynamic-merge"``: the paper's reparameterisation. Each expert's two convs
  are composed into one kxk conv once (when the form is set); per image, the
  gate-weighted sum of those kernels with ``BN_all`` folded in, plus
  ``g_mix`` times the merged ``S_t``, plus ``G``, is ONE kxk conv whose weights
  depend on the input. It is computed for the whole batch at once: the
  kernels of all images come from one einsum and are applied as a grouped
  conv (``groups=B``) over a ``(1, B*C, H, W)`` view (the official code loops
  over the images in Python).
* ``"factorized"``: static weights, exact. All experts' down-projections in
  one kxk conv C -> sum(r); each expert's channel group multiplied by its gate;
  all up-projections in one 1x1 conv sum(r) -> C with ``BN_all``'s scale
  folded in; the gate-weighted bias as a small (B, E) x (E, C) matmul; plus
  ``g_mix * S_t`` and ``G``. Exportable with the weights as constants (int8,
  XNNPACK, Core ML), at the cost of evaluating all ranks per pixel.

The merged weights are cached (non-persistent buffers) when a form is set:
call :meth:`MLoRE.set_form` again after loading other weights.

Where this code differs from the official one (intentionally):

* The official ViT drops the class token (it adds ``pos_embed[:, 1:]`` to the
  patch tokens only); the timm ViT used here keeps it, so pretrained timm
  checkpoints load unchanged. Cost: one token of 1009 (NYUD) / 1025 (PASCAL),
  about +0.1% backbone MACs and 1 024 parameters.
* The router's noise std-devs are used as produced (they may be negative), as
  in the official code; the noise is drawn only in training mode.
* The official conv heads (``ConvHead``) initialise the 3x3 conv with a
  truncated normal (std 0.02); we use PyTorch's default conv init everywhere
  except the experts' biases (zero, as officially).

The routers' spatial pooling is a ``Linear(H*W -> 1)`` over the 1/16 grid, so
a model accepts only the input size it was built for (``img_size``); other
sizes raise :class:`~edgemt.errors.ConfigError` naming the size to pad to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgemt.errors import ConfigError
from edgemt.models.backbones import ConvTapBackbone, ViTBackbone
from edgemt.models.registry import MultiTaskModel, register_model
from edgemt.tasks import Task

__all__ = [
    "FORMS",
    "GATINGS",
    "LowRankExpert",
    "Router",
    "MoEBlock",
    "MLoRE",
    "noisy_top_k_gates",
    "cv_squared",
    "load_balance_loss",
    "mlore_vitl_nyud",
    "mlore_vitl_pascal",
    "mlore_vitb_nyud",
    "mlore_vitb_pascal",
    "mlore_vits_nyud",
    "mlore_vits_pascal",
    "mlore_tiny",
]

FORMS = ("training", "dynamic-merge", "factorized")
GATINGS = ("nyud", "pascal")

# Expert ranks of the official configs.
NYUD_RANKS = tuple(range(16, 241, 16))  # 16, 32, ..., 240
PASCAL_RANKS = tuple(range(16, 129, 8))  # 16, 24, ..., 128
SMALL_RANKS = tuple(range(8, 65, 4))  # 8, 12, ..., 64 (ViT-S)

# Softmax input for dropped experts in the NYUD gating (the official constant).
_MASKED_LOGIT = -1e10


# --------------------------------------------------------------------------- gating


def noisy_top_k_gates(
    logits: torch.Tensor, noise_std: torch.Tensor, k: int, gating: str, training: bool
) -> torch.Tensor:
    """Per-image gates ``(B, E)`` with exactly ``E - k`` experts dropped.

    Args:
        logits: ``(B, E)`` router logits.
        noise_std: ``(B, E)`` std-devs of the Gaussian noise added in training.
        k: experts kept per image.
        gating: ``"nyud"`` (mask logits to -1e10, then softmax: kept gates sum
            to 1) or ``"pascal"`` (softmax over all E, then zero the dropped).
        training: add the noise (the official code adds it only in training).
    """
    if training:
        logits = logits + torch.randn_like(logits) * noise_std
    drop = logits.shape[1] - k
    if gating == "nyud":
        if drop > 0:
            idx = logits.topk(drop, dim=1, largest=False).indices
            logits = logits.scatter(1, idx, _MASKED_LOGIT)
        return logits.softmax(dim=1)
    probs = logits.softmax(dim=1)
    if drop > 0:
        idx = probs.topk(drop, dim=1, largest=False).indices
        probs = probs.scatter(1, idx, 0.0)
    return probs


def cv_squared(gates: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of the per-expert mean gate of ``(N, E)`` gates."""
    load = gates.mean(dim=0)
    return (load.std() / load.mean()) ** 2  # unbiased std, as torch.std in the official loss


def load_balance_loss(blocks: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Sum over MoE blocks of the CV^2 of the gates of all tasks and images of that block.

    Args:
        blocks: per block, ``{task: (B, E) gates}``; the tasks' gates are
            stacked (``(T*B, E)``) before the per-expert mean, as officially.
    """
    return sum(cv_squared(torch.cat(list(g.values()), dim=0)) for g in blocks)


# --------------------------------------------------------------------------- blocks


class LowRankExpert(nn.Module):
    """kxk conv C -> r, then 1x1 conv r -> C, without a nonlinearity (so it merges into one kxk conv)."""

    def __init__(self, channels: int, rank: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, rank, kernel_size, padding=kernel_size // 2)
        self.up = nn.Conv2d(rank, channels, 1)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent single kxk conv: ``(weight (C, C, k, k), bias (C,))``.

        Exact also at the borders: the 1x1 up-projection is pointwise, so it
        commutes with the zero padding of the down-projection.
        """
        up = self.up.weight.flatten(1)  # (C, r)
        weight = torch.einsum("or,rikl->oikl", up, self.down.weight)
        bias = self.up.bias + up @ self.down.bias
        return weight, bias


class Router(nn.Module):
    """Per-image router of one task: ``2E + 1`` values from a local and a global branch.

    Branch A: 1x1 conv C -> C/4, LayerNorm over channels, GELU, 1x1 conv,
    global average pool. Branch B: learned spatial pooling ``Linear(H*W -> 1)``
    per channel, LayerNorm, GELU, 1x1 conv C -> C/4. Both are concatenated and
    a 1x1 conv gives E logits, E noise std-devs and the mixing scalar ``g_mix``.
    """

    def __init__(self, channels: int, num_experts: int, grid_pixels: int) -> None:
        super().__init__()
        hidden = channels // 4
        self.num_experts = num_experts
        self.local_in = nn.Conv2d(channels, hidden, 1)
        self.local_norm = nn.LayerNorm(hidden)
        self.local_out = nn.Conv2d(hidden, hidden, 1)
        self.spatial_pool = nn.Linear(grid_pixels, 1)
        self.global_norm = nn.LayerNorm(channels)
        self.global_out = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(2 * hidden, 2 * num_experts + 1, 1)
        nn.init.trunc_normal_(self.spatial_pool.weight, std=0.02)  # the official ViT init of nn.Linear
        nn.init.zeros_(self.spatial_pool.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits (B, E), noise_std (B, E), g_mix (B,))`` for ``x`` ``(B, C, H, W)``."""
        a = self.local_in(x)
        a = self.local_norm(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # The official code pools after the 1x1 conv (not before); kept for MAC parity.
        a = self.local_out(self.act(a)).mean(dim=(2, 3), keepdim=True)
        b = self.spatial_pool(x.flatten(2)).squeeze(-1)  # (B, C)
        b = self.global_out(self.act(self.global_norm(b))[:, :, None, None])
        out = self.out(torch.cat([a, b], dim=1)).flatten(1)
        e = self.num_experts
        return out[:, :e], out[:, e : 2 * e], out[:, 2 * e]


class MoEBlock(nn.Module):
    """One mixture-of-low-rank-experts block over all tasks (see the module docstring).

    Args:
        channels: width C.
        task_names: the tasks (each has its own in/out 1x1 convs, router, BNs, S_t).
        ranks: the shared experts' ranks (E = ``len(ranks)``).
        task_rank: rank of the task-specific expert S_t.
        top_k: experts kept per image and task.
        gating: ``"nyud"`` | ``"pascal"`` (see :func:`noisy_top_k_gates`).
        grid_pixels: H*W of the feature map (the routers' spatial pooling).
        kernel_size: kernel of the experts' down-projections (G is always 3x3).
    """

    def __init__(
        self,
        channels: int,
        task_names: Sequence[str],
        ranks: Sequence[int],
        task_rank: int,
        top_k: int,
        gating: str,
        grid_pixels: int,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.task_names = list(task_names)
        self.ranks = [int(r) for r in ranks]
        self.top_k = top_k
        self.gating = gating
        self.kernel_size = kernel_size
        self.merged_kernel = max(kernel_size, 3)
        self.proj_in = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in task_names})
        self.routers = nn.ModuleDict({t: Router(channels, len(ranks), grid_pixels) for t in task_names})
        self.experts = nn.ModuleList(LowRankExpert(channels, r, kernel_size) for r in self.ranks)
        self.task_experts = nn.ModuleDict({t: LowRankExpert(channels, task_rank, kernel_size) for t in task_names})
        self.generic = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_experts = nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in task_names})
        self.bn = nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in task_names})
        self.act = nn.GELU()
        self.proj_out = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in task_names})
        # Which rank channel belongs to which expert (the factorized form's gate broadcast).
        owner = torch.tensor([i for i, r in enumerate(self.ranks) for _ in range(r)])
        self.register_buffer("rank_owner", owner, persistent=False)
        self.form = "training"
        self._cache_names: list[str] = []
        self.last_gates: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- forward

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{task: (B, C, H, W)}`` -> ``{task: (B, C, H, W)}``; records ``last_gates``."""
        if self.form != "training" and self.training:
            raise ConfigError(f"MoE form {self.form!r} folds BatchNorm statistics: call model.eval() first")
        xs, gates_seen, mixes = {}, {}, {}
        for t in self.task_names:
            xs[t] = self.proj_in[t](feats[t])
            logits, noise_std, mixes[t] = self.routers[t](xs[t])
            gates_seen[t] = noisy_top_k_gates(logits, noise_std, self.top_k, self.gating, self.training)
        if self.form == "training":
            mixed = self._mix_training(xs, gates_seen, mixes)
        out = {}
        for ti, t in enumerate(self.task_names):
            x, gates, mix = xs[t], gates_seen[t], mixes[t]
            if self.form == "training":
                y = mixed[t]
            elif self.form == "dynamic-merge":
                y = self._mix_dynamic(ti, x, gates, mix)
            else:
                y = self._mix_factorized(t, ti, x, gates, mix)
            out[t] = self.proj_out[t](self.act(self.bn[t](y)))
        self.last_gates = gates_seen
        return out

    def _mix_training(
        self, xs: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor], mixes: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``BN_all_t(sum_i g_i E_i(x_t)) + g_mix S_t(x_t) + G(x_t.detach())`` for every task.

        Every expert runs on every image (as officially; dropped ones get a zero
        gate), but as two convs for all experts and tasks instead of 2*E*T: the
        down-projections concatenated (C -> sum r), each expert's rank channels
        scaled by its gate, the up-projections concatenated (sum r -> C), the
        gate-weighted up biases added. The same sum, hundreds fewer kernel launches.
        """
        names = self.task_names
        b = xs[names[0]].shape[0]
        x_all = torch.cat([xs[t] for t in names])  # (T*B, C, H, W): experts and G are shared by tasks
        g_all = torch.cat([gates[t] for t in names])  # (T*B, E)
        down_w = torch.cat([e.down.weight for e in self.experts])
        down_b = torch.cat([e.down.bias for e in self.experts])
        up_w = torch.cat([e.up.weight for e in self.experts], dim=1)
        up_b = torch.stack([e.up.bias for e in self.experts])  # (E, C)
        h = F.conv2d(x_all, down_w, down_b, padding=self.kernel_size // 2)
        h = h * g_all.index_select(1, self.rank_owner)[:, :, None, None]
        experts = F.conv2d(h, up_w) + (g_all @ up_b)[:, :, None, None]
        generic = self.generic(x_all.detach())
        out = {}
        for i, t in enumerate(names):
            rows = slice(i * b, (i + 1) * b)
            task = mixes[t][:, None, None, None] * self.task_experts[t](xs[t])
            out[t] = self.bn_experts[t](experts[rows]) + task + generic[rows]
        return out

    def _mix_dynamic(self, ti: int, x: torch.Tensor, gates: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.merged_kernel
        bank_w, bank_b = self._cache("dm_bank_w"), self._cache("dm_bank_b")  # (E, C, C, k, k), (E, C)
        scale, shift = self._cache(f"bn_scale_{ti}"), self._cache(f"dm_shift_{ti}")  # (C,), (C,)
        task_w, task_b = self._cache(f"dm_task_w_{ti}"), self._cache(f"dm_task_b_{ti}")
        # One kernel per image: sum_i g_i K_i, BN_all's scale per output channel, + g_mix K_S + K_G.
        weight = torch.einsum("be,eoikl->boikl", gates, bank_w) * scale[None, :, None, None, None]
        weight = weight + mix[:, None, None, None, None] * task_w + self._cache("dm_generic_w")
        bias = (gates @ bank_b) * scale + shift + mix[:, None] * task_b  # (B, C)
        y = F.conv2d(
            x.reshape(1, b * c, h, w), weight.reshape(b * c, c, k, k), bias.reshape(b * c), padding=k // 2, groups=b
        )
        return y.reshape(b, c, h, w)

    def _mix_factorized(self, t: str, ti: int, x: torch.Tensor, gates: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        down = F.conv2d(x, self._cache("fz_down_w"), self._cache("fz_down_b"), padding=self.kernel_size // 2)
        down = down * gates.index_select(1, self.rank_owner)[:, :, None, None]
        y = F.conv2d(down, self._cache(f"fz_up_w_{ti}"))  # BN_all's scale folded into the weights
        bias = gates @ self._cache(f"fz_up_b_{ti}") + self._cache(f"fz_shift_{ti}")  # (B, C)
        y = y + bias[:, :, None, None]
        return y + mix[:, None, None, None] * self.task_experts[t](x) + self.generic(x)

    # ---------------------------------------------------------------- forms

    def set_form(self, form: str) -> None:
        """Switch to ``form`` and (re)compute its merged weights from the current parameters."""
        if form not in FORMS:
            raise ConfigError(f"unknown MoE form {form!r}; expected one of {list(FORMS)}")
        if form != "training" and self.training:
            raise ConfigError(f"MoE form {form!r} folds BatchNorm running statistics: call model.eval() first")
        for name in self._cache_names:
            delattr(self, name)
        self._cache_names = []
        self.form = form
        if form == "training":
            return
        with torch.no_grad():
            if form == "dynamic-merge":
                self._build_dynamic_cache()
            else:
                self._build_factorized_cache()

    def _set_cache(self, name: str, value: torch.Tensor) -> None:
        full = f"_cache_{name}"
        self.register_buffer(full, value.detach().contiguous(), persistent=False)
        self._cache_names.append(full)

    def _cache(self, name: str) -> torch.Tensor:
        return getattr(self, f"_cache_{name}")

    def _bn_fold(self, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    def _pad(self, w: torch.Tensor) -> torch.Tensor:
        p = (self.merged_kernel - w.shape[-1]) // 2
        return F.pad(w, (p, p, p, p)) if p else w

    def _build_dynamic_cache(self) -> None:
        merged = [e.merged() for e in self.experts]
        self._set_cache("dm_bank_w", self._pad(torch.stack([w for w, _ in merged])))
        self._set_cache("dm_bank_b", torch.stack([b for _, b in merged]))
        self._set_cache("dm_generic_w", self._pad(self.generic.weight))
        for ti, t in enumerate(self.task_names):
            scale, shift = self._bn_fold(self.bn_experts[t])
            task_w, task_b = self.task_experts[t].merged()
            self._set_cache(f"bn_scale_{ti}", scale)
            self._set_cache(f"dm_shift_{ti}", shift + self.generic.bias)
            self._set_cache(f"dm_task_w_{ti}", self._pad(task_w))
            self._set_cache(f"dm_task_b_{ti}", task_b)

    def _build_factorized_cache(self) -> None:
        self._set_cache("fz_down_w", torch.cat([e.down.weight for e in self.experts]))
        self._set_cache("fz_down_b", torch.cat([e.down.bias for e in self.experts]))
        up_w = torch.cat([e.up.weight for e in self.experts], dim=1)  # (C, sum r, 1, 1)
        up_b = torch.stack([e.up.bias for e in self.experts])  # (E, C)
        for ti, t in enumerate(self.task_names):
            scale, shift = self._bn_fold(self.bn_experts[t])
            self._set_cache(f"fz_up_w_{ti}", up_w * scale[:, None, None, None])
            self._set_cache(f"fz_up_b_{ti}", up_b * scale)
            self._set_cache(f"fz_shift_{ti}", shift)


# --------------------------------------------------------------------------- model


class MLoRE(MultiTaskModel):
    """MLoRE on a timm ViT (see the module docstring).

    Args:
        tasks: resolved task entries (any subset of the registry's tasks).
        backbone: timm ViT name (``vit_large_patch16_384``, ...), or ``"conv"`` for the
            small conv encoder of CPU-scale runs (:class:`ConvTapBackbone`; ``backbone_kwargs``
            then sets its ``widths``, ``depth`` and ``stride``).
        img_size: the training and inference input size ``(H, W)``, multiples of the feature stride.
        channels: decoder width C.
        ranks: ranks of the E shared experts.
        task_rank: rank of each task-specific expert.
        top_k: experts kept per image, task and block.
        gating: ``"nyud"`` | ``"pascal"`` (see :func:`noisy_top_k_gates`).
        kernel_size: kernel of the experts' first conv.
        load_balance_weight: weight of the CV^2 loss in :meth:`extra_losses`.
        pretrained_path: local backbone weights (``.npz``, ``.safetensors``, ``.pth``).
        backbone_kwargs: extra timm kwargs (``drop_path_rate``; ``embed_dim``,
            ``depth``, ``num_heads`` for tiny variants).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        backbone: str = "vit_large_patch16_384",
        img_size: Sequence[int] = (448, 576),
        channels: int = 768,
        ranks: Sequence[int] = NYUD_RANKS,
        task_rank: int = 16,
        top_k: int = 9,
        gating: str = "nyud",
        kernel_size: int = 3,
        load_balance_weight: float = 5e-4,
        pretrained_path: str | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        if gating not in GATINGS:
            raise ConfigError(f"gating {gating!r}: expected one of {list(GATINGS)}")
        if not ranks or not 1 <= top_k <= len(ranks):
            raise ConfigError(f"top_k={top_k}: must be between 1 and the number of experts ({len(ranks)})")
        if kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size={kernel_size}: must be odd")
        if channels < 4:
            raise ConfigError(f"channels={channels}: must be at least 4 (the routers use C/4)")
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.load_balance_weight = float(load_balance_weight)
        if backbone == "conv":
            # CPU-scale stand-in for the ViT (see ConvTapBackbone); the decoder is unchanged.
            self.backbone = ConvTapBackbone(**dict(backbone_kwargs or {}))
            stride = self.backbone.stride
            tap_channels = self.backbone.tap_channels
        else:
            self.backbone = ViTBackbone(
                backbone, self.img_size, pretrained_path=pretrained_path, **dict(backbone_kwargs or {})
            )
            stride = self.backbone.vit.patch_embed.patch_size[0]
            tap_channels = [self.backbone.embed_dim] * len(self.backbone.taps)
        if self.img_size[0] % stride or self.img_size[1] % stride:
            raise ConfigError(f"img_size {self.img_size}: both sides must be multiples of the feature stride {stride}")
        self.stride = stride
        self.grid = (self.img_size[0] // stride, self.img_size[1] // stride)
        n_taps = len(tap_channels)
        names = self.task_names

        def block() -> MoEBlock:
            return MoEBlock(channels, names, ranks, task_rank, top_k, gating, self.grid[0] * self.grid[1], kernel_size)

        self.tap_proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in tap_channels)
        self.moe1 = nn.ModuleList(block() for _ in range(n_taps))
        self.moe2 = nn.ModuleList(block() for _ in range(n_taps))
        self.tap_fusion = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(channels * n_taps, channels, 1),
                    nn.BatchNorm2d(channels),
                    nn.GELU(),
                    nn.Conv2d(channels, n_taps, 3, padding=1),
                )
                for t in names
            }
        )
        self.heads = nn.ModuleDict(
            {
                t.name: nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1),
                    nn.BatchNorm2d(channels),
                    nn.GELU(),
                    nn.Conv2d(channels, t.channels, 1),
                )
                for t in tasks
            }
        )
        self.form = "training"
        self._load_balance: torch.Tensor | None = None

    # ---------------------------------------------------------------- API

    def moe_blocks(self) -> list[MoEBlock]:
        """All MoE blocks, first stage then second stage, taps in order."""
        return [*self.moe1, *self.moe2]

    def set_form(self, form: str) -> MLoRE:
        """Switch every MoE block to ``"training"``, ``"dynamic-merge"`` or ``"factorized"``.

        The merged forms need eval mode and snapshot the current weights.

        Raises:
            ConfigError: an unknown form, or a merged form in training mode.
        """
        if form not in FORMS:
            raise ConfigError(f"unknown form {form!r}; expected one of {list(FORMS)}")
        if form != "training" and self.training:
            raise ConfigError(f"form {form!r} folds BatchNorm running statistics: call model.eval() first")
        for blk in self.moe_blocks():
            blk.set_form(form)
        self.form = form
        return self

    def gates(self) -> dict[str, dict[str, torch.Tensor]]:
        """Gates ``(B, E)`` of the last forward: ``{"moe1.0": {task: gates}, ...}``."""
        out = {}
        for stage, blocks in (("moe1", self.moe1), ("moe2", self.moe2)):
            for i, blk in enumerate(blocks):
                out[f"{stage}.{i}"] = dict(blk.last_gates)
        return out

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """``{"load_balance": weight * sum of CV^2}`` of the last training-mode forward."""
        if self._load_balance is None:
            return {}
        return {"load_balance": self.load_balance_weight * self._load_balance}

    # ---------------------------------------------------------------- forward

    def _check_input(self, x: torch.Tensor) -> None:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if (h, w) != self.img_size:
            eh, ew = self.img_size
            raise ConfigError(
                f"Wrong input shape height={h}, width={w}. This MLoRE model was built for "
                f"img_size=({eh}, {ew}): its routers pool a fixed {self.grid[0]}x{self.grid[1]} feature grid. "
                f"Consider padding your images to shape ({eh}, {ew}), or build the model with img_size=({h}, {w}) "
                f"(both multiples of 16)."
            )

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task fused decoder features ``(B, C, H/4, W/4)``."""
        self._check_input(x)
        taps = self.backbone(x)
        if isinstance(self.backbone, ViTBackbone):
            # The official model applies the ViT's final LayerNorm to the last tap only.
            taps[-1] = self.backbone.vit.norm(taps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        per_task: dict[str, list[torch.Tensor]] = {t: [] for t in self.task_names}
        for i, tap in enumerate(taps):
            shared = self.tap_proj[i](tap)
            feats = self.moe2[i](self.moe1[i]({t: shared for t in self.task_names}))
            for t in self.task_names:
                per_task[t].append(feats[t])
        if self.training:
            self._load_balance = load_balance_loss([blk.last_gates for blk in self.moe_blocks()])
        out = {}
        for t, maps in per_task.items():
            weights = self.tap_fusion[t](torch.cat(maps, dim=1)).softmax(dim=1)
            fused = sum(weights[:, i : i + 1] * m for i, m in enumerate(maps))
            # The heads work at 1/4 (x4 from the ViT's 1/16 grid).
            out[t] = (
                fused
                if self.stride == 4
                else F.interpolate(fused, scale_factor=self.stride // 4, mode="bilinear", align_corners=False)
            )
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.forward_features(x)
        return {
            t: F.interpolate(self.heads[t](feats[t]), size=size, mode="bilinear", align_corners=False)
            for t in self.task_names
        }


# --------------------------------------------------------------------------- variants

_NYUD_SIZE = (448, 576)
_PASCAL_SIZE = (512, 512)
_DROP_PATH = {"drop_path_rate": 0.15}  # the official backbones' stochastic depth


def _build(tasks: Sequence[Task], defaults: dict[str, Any], kw: dict[str, Any]) -> MLoRE:
    cfg = {**defaults, **kw}
    cfg["backbone_kwargs"] = {**defaults.get("backbone_kwargs", {}), **(kw.get("backbone_kwargs") or {})}
    return MLoRE(tasks, **cfg)


@register_model
def mlore_vitl_nyud(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """ViT-L/16, NYUD-v2 (``configs/nyud/nyud_vitLp16_MLoRE.yml``)."""
    defaults = dict(
        backbone="vit_large_patch16_384", img_size=_NYUD_SIZE, channels=768, ranks=NYUD_RANKS, task_rank=16,
        gating="nyud", load_balance_weight=5e-4, backbone_kwargs=_DROP_PATH,
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_vitl_pascal(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """ViT-L/16, PASCAL-Context (``configs/pascal/pascal_vitLp16_MLoRE.yml``)."""
    defaults = dict(
        backbone="vit_large_patch16_384", img_size=_PASCAL_SIZE, channels=452, ranks=PASCAL_RANKS, task_rank=72,
        gating="pascal", load_balance_weight=3e-4, backbone_kwargs=_DROP_PATH,
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_vitb_nyud(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """ViT-B/16, NYUD-v2. No official config: ViT-B's width 640 with the NYUD ranks, gating and loss weight."""
    defaults = dict(
        backbone="vit_base_patch16_384", img_size=_NYUD_SIZE, channels=640, ranks=NYUD_RANKS, task_rank=16,
        gating="nyud", load_balance_weight=5e-4, backbone_kwargs=_DROP_PATH,
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_vitb_pascal(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """ViT-B/16, PASCAL-Context (``configs/pascal/pascal_vitBp16_MLoRE.yml``)."""
    defaults = dict(
        backbone="vit_base_patch16_384", img_size=_PASCAL_SIZE, channels=640, ranks=PASCAL_RANKS, task_rank=64,
        gating="pascal", load_balance_weight=1e-4, backbone_kwargs=_DROP_PATH,
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_vits_nyud(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """ViT-S/16, NYUD-v2. No official config: the ViT-S PASCAL sizes with the NYUD gating and loss weight."""
    defaults = dict(
        backbone="vit_small_patch16_384", img_size=_NYUD_SIZE, channels=192, ranks=SMALL_RANKS, task_rank=32,
        gating="nyud", load_balance_weight=5e-4, backbone_kwargs=_DROP_PATH,
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_vits_pascal(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """ViT-S/16, PASCAL-Context (``configs/pascal/pascal_vitSp16_MLoRE.yml``; it sets no
    ``pre_softmax``, we use the PASCAL gating)."""
    defaults = dict(
        backbone="vit_small_patch16_384", img_size=_PASCAL_SIZE, channels=192, ranks=SMALL_RANKS, task_rank=32,
        gating="pascal", load_balance_weight=1e-4, backbone_kwargs=_DROP_PATH,
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_tiny(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """A CPU-test size: ViT 48-d, 4 blocks, 2 heads; C=32; 4 experts, top-2; input 64x96."""
    defaults = dict(
        backbone="vit_small_patch16_384", img_size=(64, 96), channels=32, ranks=(2, 4, 6, 8), task_rank=4,
        top_k=2, gating="pascal", load_balance_weight=5e-4,
        backbone_kwargs={"embed_dim": 48, "depth": 4, "num_heads": 2},
    )  # fmt: skip
    return _build(tasks, defaults, kw)


@register_model
def mlore_conv_s(*, tasks: Sequence[Task], **kw: Any) -> MLoRE:
    """MLoRE's decoder on a small conv encoder (taps at strides 2-16 resampled to 1/8), for CPU-scale
    runs on the synthetic scenes: the demo's teacher. C=32, 6 shared experts (top-3), ranks 4-24."""
    defaults = dict(
        backbone="conv", img_size=(96, 128), channels=32, ranks=(4, 8, 12, 16, 20, 24), task_rank=8,
        top_k=3, gating="nyud", load_balance_weight=5e-4,
        backbone_kwargs={"widths": (16, 32, 64, 128), "depth": 1, "stride": 8},
    )  # fmt: skip
    return _build(tasks, defaults, kw)
