"""Students: a timm mobile backbone, a light FPN neck, per-task low-rank expert
decoder blocks and depthwise-separable heads, built to be reparameterized for
deployment.

Architecture (DESIGN.md section 5):

* **Backbone**: a timm model with ``features_only=True`` (strides 4, 8, 16,
  32), e.g. ``mobilenetv4_conv_small``, ``mobilenetv3_large_100``,
  ``efficientnet_lite0``. Weights only from a local file (``pretrained_path``).
* **Neck**: 1x1 conv-BN-ReLU laterals of strides 8/16/32 to ``width`` C,
  top-down bilinear x2 + add to 1/8, one depthwise-separable smoothing conv;
  the stride-4 feature gets a 1x1 lateral to the head width (detail skip).
* **Decoder**: per task, ``num_blocks`` :class:`LowRankExpertBlock` at 1/8.
  The first block reads the shared neck map, later ones the task's own map.
  For task t with input x::

      y_t = sum_i g_ti U_i D_i x  +  m_t U^s_t D^s_t x  +  U^g D^g x
      out_t = x + ReLU(BN_t(y_t))

  ``D`` are kxk convs C -> r (no bias), ``U`` 1x1 convs r -> C (no bias):
  E low-rank experts shared by the tasks (ranks ``ranks``), a low-rank task
  expert per task (rank ``task_rank``) and a low-rank generic path shared by
  the tasks (rank ``generic_rank``, constant gate 1). ``g_t`` are softmax
  gates from a per-image router (global average pool -> linear; optional
  top-k), ``m_t`` an unbounded mix scalar from the same router (as MLoRE's
  ``g_mix``).
* **Heads** (per task): bilinear x2 to 1/4, plus the stride-4 skip,
  depthwise-separable conv (dw 3x3-BN-ReLU, pw 1x1-BN-ReLU), 1x1 prediction,
  bilinear to the input size. With ``output_stride = 4`` (set by exporters
  through :func:`edgemt.models.graph_output_stride`) the forward stops
  before that last upsampling and returns the 1/4 maps: on the demo student
  at 256x320 in ONNX Runtime int8, the four full-resolution upsamplings were
  a quarter of the latency, and pruning cannot shrink them.

Every op (conv, BN, ReLU, mean, linear, softmax, broadcast multiply, resize,
add, concat) exports to ONNX, TFLite and Core ML; there is no data-dependent
Python control flow in ``forward``.

Deploy forms (:meth:`StudentMTL.set_form`, eval mode; one-way, like RepVGG's
deploy switch: the training modules are dropped and only what the form
computes with is kept, so the artifact carries no dead weights):

* ``"training"``: the structure above.
* ``"dynamic-merge"``: per image and task, the gate-weighted sum of the
  composed expert kernels (``U_i D_i`` as one kxk conv) plus the task and
  generic kernels, with BN_t folded in, is ONE kxk conv whose weights depend on
  the input; computed for the whole batch as a grouped conv. Exact.
* ``"factorized"``: static weights, exact. All down-projections in one kxk
  conv C -> sum(r) (shared by the tasks where the input is shared), each
  channel scaled by its gate (``[g_t, m_t] @ expand_t + const_t``: a small
  matmul giving the expert's gate, the mix, 1 for the generic path and 0 for
  other tasks' channels, then a broadcast multiply), all up-projections of
  task t in one 1x1 conv with BN_t folded in. No slicing or concatenation.
* ``"frozen-gate"``: the gates are fixed per task (``frozen_gates``, by
  default their training-set mean, see
  :func:`edgemt.compress.reparam.calibrate_gates`), so each task's block is
  ONE static kxk conv; the routers disappear. Lossy; the loss is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgemt.errors import ConfigError
from edgemt.models.backbones import conv_bn_act, load_backbone_weights
from edgemt.models.registry import MultiTaskModel, register_model
from edgemt.tasks import Task

__all__ = ["FORMS", "LowRankExpertBlock", "StudentMTL", "student_xs", "student_s", "student_m"]

FORMS = ("training", "dynamic-merge", "factorized", "frozen-gate")


def _dw_separable(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_act(cin, cin, 3, groups=cin), conv_bn_act(cin, cout, 1))


class LowRankExpertBlock(nn.Module):
    """One decoder stage for all tasks: shared low-rank experts, a low-rank task
    expert per task, a low-rank generic path, per-task routers and BN.

    ``forward`` takes either one tensor (the input shared by every task) or a
    dict task -> tensor, and returns dict task -> tensor.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        channels: int,
        ranks: Sequence[int],
        task_rank: int,
        generic_rank: int,
        kernel_size: int = 3,
        top_k: int | None = None,
        shared_input: bool = True,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.shared_input = bool(shared_input)
        self.channels, self.k = int(channels), int(kernel_size)
        self.ranks = [int(r) for r in ranks]
        self.num_experts = len(self.ranks)
        if self.num_experts < 1 or min(self.ranks) < 1 or task_rank < 1 or generic_rank < 1:
            raise ConfigError(f"expert ranks must be positive: ranks={ranks}, task={task_rank}, generic={generic_rank}")
        if top_k is not None and not 1 <= top_k <= self.num_experts:
            raise ConfigError(f"top_k={top_k}: expected 1..{self.num_experts} (the number of experts)")
        self.top_k = top_k
        c, k = self.channels, self.k
        self.down = nn.ModuleList(nn.Conv2d(c, r, k, padding=k // 2, bias=False) for r in self.ranks)
        self.up = nn.ModuleList(nn.Conv2d(r, c, 1, bias=False) for r in self.ranks)
        self.generic_down = nn.Conv2d(c, generic_rank, k, padding=k // 2, bias=False)
        self.generic_up = nn.Conv2d(generic_rank, c, 1, bias=False)
        self.task_down = nn.ModuleDict({t: nn.Conv2d(c, task_rank, k, padding=k // 2, bias=False) for t in task_names})
        self.task_up = nn.ModuleDict({t: nn.Conv2d(task_rank, c, 1, bias=False) for t in task_names})
        self.norm = nn.ModuleDict({t: nn.BatchNorm2d(c) for t in task_names})
        # Router: pooled input -> E expert logits and one mix scalar.
        self.router = nn.ModuleDict({t: nn.Linear(c, self.num_experts + 1) for t in task_names})
        for lin in self.router.values():
            nn.init.zeros_(lin.bias)
            nn.init.normal_(lin.weight, std=0.01)
            with torch.no_grad():
                lin.bias[-1] = 1.0  # the task expert starts fully mixed in
        self.register_buffer("frozen_gates", torch.full((len(task_names), self.num_experts + 1), float("nan")))
        self.form = "training"
        self.gate_override: torch.Tensor | None = None  # (T, E+1): replaces the router (tests, frozen-gate tuning)
        self.last_gates: dict[str, torch.Tensor] = {}
        self._gates_for_loss: list[torch.Tensor] = []
        self.deploy = nn.ModuleDict()

    # ------------------------------------------------------------------ gating

    def route(self, t: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``(B, E)`` (softmax, top-k masked if set) and mix ``(B, 1)`` of task ``t``."""
        ti = self.task_names.index(t)
        if self.gate_override is not None:
            g = self.gate_override[ti].to(x.dtype).expand(x.shape[0], -1)
            return g[:, :-1], g[:, -1:]
        # adaptive_avg_pool2d rather than mean((2, 3)): LiteRT's NHWC layout pass rejects a quantized mean over H, W.
        logits = self.router[t](F.adaptive_avg_pool2d(x, 1).flatten(1))
        gl, mix = logits[:, :-1], logits[:, -1:]
        if self.top_k is not None and self.top_k < self.num_experts:
            kth = gl.topk(self.top_k, dim=1).values[:, -1:]
            gl = gl.masked_fill(gl < kth, -1e4)
        return gl.softmax(dim=1), mix

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(x, dict) == self.shared_input:
            raise ConfigError(
                f"LowRankExpertBlock(shared_input={self.shared_input}) got "
                f"{'a dict per task' if isinstance(x, dict) else 'one shared tensor'}"
            )
        feats = x if isinstance(x, dict) else {t: x for t in self.task_names}
        shared = self.shared_input
        record = not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        out, gates_all = {}, []
        if self.form == "training":
            out, gates_all = self._forward_training(feats, shared)
        elif self.form == "dynamic-merge":
            for t in self.task_names:
                g, mix = self.route(t, feats[t])
                gates_all.append(torch.cat([g, mix], 1))
                out[t] = feats[t] + F.relu(self._dynamic(t, feats[t], g, mix))
        elif self.form == "factorized":
            z_shared = self.deploy["down"](feats[self.task_names[0]]) if shared else None
            for t in self.task_names:
                g, mix = self.route(t, feats[t])
                if record:
                    gates_all.append(torch.cat([g, mix], 1))
                z = z_shared if shared else self.deploy[f"down_{t}"](feats[t])
                # One scale per down-projection channel: its expert's gate, the mix for the task
                # expert, 1 for the generic path, 0 for other tasks' task-expert channels. The gates
                # and the mix are not concatenated: an int8 concat shares one scale between the
                # softmax gates (fixed to [0, 1) in TFLite) and the unbounded mix, which would clip.
                expand = getattr(self, f"fz_expand_{t}")
                scale = g @ expand[:-1] + mix * expand[-1:] + getattr(self, f"fz_const_{t}")
                out[t] = feats[t] + F.relu(self.deploy[f"up_{t}"](z * scale[:, :, None, None]))
        else:  # frozen-gate
            for t in self.task_names:
                out[t] = feats[t] + F.relu(self.deploy[f"conv_{t}"](feats[t]))
        if record and gates_all:
            self.last_gates = {t: g.detach() for t, g in zip(self.task_names, gates_all)}
            self._gates_for_loss = gates_all if self.training else []
        return out

    def _forward_training(self, feats: dict[str, torch.Tensor], shared: bool):
        out, gates_all = {}, []
        x0 = feats[self.task_names[0]]
        shared_downs = [d(x0) for d in self.down] if shared else None
        shared_generic = self.generic_up(self.generic_down(x0)) if shared else None
        for t in self.task_names:
            x = feats[t]
            g, mix = self.route(t, x)
            gates_all.append(torch.cat([g, mix], 1))
            downs = shared_downs if shared else [d(x) for d in self.down]
            y = shared_generic if shared else self.generic_up(self.generic_down(x))
            y = y + mix[:, :, None, None] * self.task_up[t](self.task_down[t](x))
            for i, (up, z) in enumerate(zip(self.up, downs)):
                y = y + g[:, i, None, None, None] * up(z)
            out[t] = x + F.relu(self.norm[t](y))
        return out, gates_all

    # ------------------------------------------------------------------ deploy forms

    def _bn(self, t: str) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.norm[t]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    @staticmethod
    def _compose(up: nn.Conv2d, down: nn.Conv2d) -> torch.Tensor:
        """A low-rank pair (kxk C -> r, then 1x1 r -> C) as one kxk kernel (C, C, k, k)."""
        return torch.einsum("or,rckl->ockl", up.weight[:, :, 0, 0], down.weight)

    def _shared_kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The composed experts (E, C, C, k, k) and generic kernel, shared by every task."""
        experts = torch.stack([self._compose(u, d) for u, d in zip(self.up, self.down)])
        return experts, self._compose(self.generic_up, self.generic_down)

    def _dynamic(self, t: str, x: torch.Tensor, g: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        experts, generic_k = self.dm_experts, self.dm_generic
        task_k, scale, bias = (getattr(self, f"dm_{n}_{t}") for n in ("task", "scale", "bias"))
        b, c, h, w = x.shape
        kernels = torch.einsum("be,eockl->bockl", g.to(experts.dtype), experts)
        kernels = kernels + mix.to(experts.dtype)[:, :, None, None, None] * task_k + generic_k
        kernels = kernels * scale[None, :, None, None, None]
        y = F.conv2d(
            x.reshape(1, b * c, h, w),
            kernels.reshape(b * c, c, self.k, self.k).to(x.dtype),
            bias.repeat(b).to(x.dtype),
            padding=self.k // 2,
            groups=b,
        )
        return y.reshape(b, c, h, w)

    @torch.no_grad()
    def set_form(self, form: str) -> None:
        if form not in FORMS:
            raise ConfigError(f"deploy form {form!r}; expected one of {FORMS}")
        if form == self.form:
            return
        if self.form != "training":
            raise ConfigError(f"block is already reparameterized to {self.form!r}; rebuild the model to change form")
        if form != "training" and self.training:
            raise ConfigError(f"form {form!r} folds BatchNorm running statistics: call model.eval() first")
        self.sync_shapes()  # the modules' sizes rule (structured pruning may have shrunk them)
        k = self.k
        if form == "dynamic-merge":
            # Merged kernels are buffers of the artifact: the composed experts (shared by the
            # tasks), the generic kernel, and per task its kernel and BN_t's scale and shift.
            experts, generic_k = self._shared_kernels()
            for t in self.task_names:
                task_k = self._compose(self.task_up[t], self.task_down[t])
                scale, bias = self._bn(t)
                for n, v in (("task", task_k), ("scale", scale), ("bias", bias)):
                    self.register_buffer(f"dm_{n}_{t}", v.detach().clone())
            self.register_buffer("dm_experts", experts.detach().clone())
            self.register_buffer("dm_generic", generic_k.detach().clone())
            self._drop_training_modules(keep_router=True)
        elif form == "factorized":
            # Down-projection channels: [experts | task expert(s) | generic]. With a shared input
            # one conv serves every task (all tasks' task-expert channels in the middle).
            downs = [d.weight for d in self.down]
            ups = [u.weight for u in self.up]
            # Task experts may have different ranks after pruning.
            rts = [self.task_down[t].out_channels for t in self.task_names]
            re, rg = sum(self.ranks), self.generic_down.out_channels
            total = re + (sum(rts) if self.shared_input else 0) + rg
            if self.shared_input:
                task_downs = [self.task_down[t].weight for t in self.task_names]
                self.deploy["down"] = self._conv(torch.cat(downs + task_downs + [self.generic_down.weight]), None, k)
            for ti, t in enumerate(self.task_names):
                rt = rts[ti]
                if not self.shared_input:
                    total = re + rt + rg
                t0 = re + (sum(rts[:ti]) if self.shared_input else 0)  # this task's task-expert channels
                expand = torch.zeros(self.num_experts + 1, total)
                offs = 0
                for i, r in enumerate(self.ranks):
                    expand[i, offs : offs + r] = 1.0
                    offs += r
                expand[-1, t0 : t0 + rt] = 1.0
                const = torch.zeros(total)
                const[total - rg :] = 1.0
                dev = self.generic_up.weight.device
                self.register_buffer(f"fz_expand_{t}", expand.to(dev))
                self.register_buffer(f"fz_const_{t}", const.to(dev))
                scale, bias = self._bn(t)
                up = torch.zeros(self.channels, total, 1, 1, device=dev)
                up[:, :re] = torch.cat(ups, 1)
                up[:, t0 : t0 + rt] = self.task_up[t].weight
                up[:, total - rg :] = self.generic_up.weight
                self.deploy[f"up_{t}"] = self._conv(up * scale[:, None, None, None], bias, 1)
                if not self.shared_input:
                    tdown = torch.cat(downs + [self.task_down[t].weight, self.generic_down.weight])
                    self.deploy[f"down_{t}"] = self._conv(tdown, None, k)
            self._drop_training_modules(keep_router=True)
        elif form == "frozen-gate":
            if torch.isnan(self.frozen_gates).any():
                raise ConfigError(
                    "frozen-gate needs frozen_gates: run edgemt.compress.reparam.calibrate_gates(model, data) first"
                )
            experts, generic_k = self._shared_kernels()
            for ti, t in enumerate(self.task_names):
                task_k = self._compose(self.task_up[t], self.task_down[t])
                gates = self.frozen_gates[ti]
                kernel = torch.einsum("e,eockl->ockl", gates[:-1], experts) + gates[-1] * task_k + generic_k
                scale, bias = self._bn(t)
                self.deploy[f"conv_{t}"] = self._conv(kernel * scale[:, None, None, None], bias, k)
            self._drop_training_modules(keep_router=False)
        self.form = form

    def sync_shapes(self) -> None:
        """Refresh the width and rank attributes from the modules (after structured pruning)."""
        self.channels = self.generic_up.out_channels
        self.ranks = [d.out_channels for d in self.down]

    @staticmethod
    def _conv(weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> nn.Conv2d:
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], k, padding=k // 2, bias=bias is not None)
        conv.weight.data.copy_(weight)
        if bias is not None:
            conv.bias.data.copy_(bias)
        return conv.to(weight.device)

    def _drop_training_modules(self, keep_router: bool) -> None:
        # Static forms keep only what their forward uses: the artifact carries no dead weights.
        for name in ("down", "up", "generic_down", "generic_up", "task_down", "task_up", "norm"):
            delattr(self, name)
        if not keep_router:
            del self.router

    def balance_loss(self) -> torch.Tensor | None:
        """CV^2 of the mean expert gates of the last training forward (all tasks), or None."""
        if not self._gates_for_loss:
            return None
        imp = torch.stack([g[:, :-1] for g in self._gates_for_loss]).float().mean(dim=(0, 1))
        return imp.var(unbiased=False) / imp.mean().pow(2).clamp_min(1e-10)


class StudentMTL(MultiTaskModel):
    """timm mobile backbone + FPN-lite neck + low-rank expert decoder + dw-separable heads.

    Args:
        tasks: resolved task entries.
        backbone: timm model name (built with ``features_only``, no download).
        pretrained_path: local backbone weights (timm .npz / safetensors / .pth).
        width: neck and decoder width C at 1/8.
        head_width: width of the heads and the stride-4 skip.
        ranks: ranks of the E shared low-rank experts.
        task_rank / generic_rank: ranks of the task expert and the generic path.
        num_blocks: expert blocks per task.
        kernel_size: kernel of the down-projections.
        top_k: keep the k largest gates per image (None: dense softmax).
        balance_weight: weight of the gates' CV^2 load-balancing loss.
        img_size: accepted for the registry's convention; the student runs at any
            size divisible by 32.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        backbone: str = "mobilenetv4_conv_small",
        pretrained_path: str | None = None,
        width: int = 64,
        head_width: int = 32,
        ranks: Sequence[int] = (4, 4, 8, 8),
        task_rank: int = 4,
        generic_rank: int = 4,
        num_blocks: int = 2,
        kernel_size: int = 3,
        top_k: int | None = None,
        balance_weight: float = 0.0,
        img_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tasks)
        import timm

        if backbone not in timm.list_models():
            raise ConfigError(f"student backbone {backbone!r} is not a timm model")
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        if pretrained_path:
            load_backbone_weights(self.backbone, pretrained_path)
        chans = self.backbone.feature_info.channels()
        reds = self.backbone.feature_info.reduction()
        if list(reds) != [4, 8, 16, 32]:
            raise ConfigError(f"student backbone {backbone!r}: feature strides {reds}, expected [4, 8, 16, 32]")
        self.backbone_name = backbone
        self.laterals = nn.ModuleList(conv_bn_act(c, width, 1) for c in chans[1:])
        self.smooth = _dw_separable(width, width)
        self.fine = conv_bn_act(chans[0], head_width, 1)
        self.blocks = nn.ModuleList(
            LowRankExpertBlock(
                self.task_names, width, ranks, task_rank, generic_rank, kernel_size, top_k, shared_input=(i == 0)
            )
            for i in range(num_blocks)
        )
        self.reduce = nn.ModuleDict({t: conv_bn_act(width, head_width, 1) for t in self.task_names})
        self.heads = nn.ModuleDict(
            {
                t.name: nn.Sequential(_dw_separable(head_width, head_width), nn.Conv2d(head_width, t.channels, 1))
                for t in tasks
            }
        )
        self.balance_weight = float(balance_weight)
        self.last_features: dict[str, torch.Tensor] = {}

    output_strides = (1, 4)

    def set_form(self, form: str) -> StudentMTL:
        """Switch every expert block to ``form`` (see the module docstring); returns self."""
        for blk in self.blocks:
            blk.set_form(form)
        return self

    def forward_decoder(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        f4, f8, f16, f32 = self.backbone(x)
        y = self.laterals[2](f32)
        for lat, f in ((self.laterals[1], f16), (self.laterals[0], f8)):
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False) + lat(f)
        y = self.smooth(y)
        feats: Any = y
        for blk in self.blocks:
            feats = blk(feats)
        if not isinstance(feats, dict):
            feats = {t: feats for t in self.task_names}
        return feats, self.fine(f4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, fine = self.forward_decoder(x)
        if not torch.compiler.is_compiling():
            self.last_features = feats  # with gradients: feature distillation reads them
        out = {}
        for t in self.task_names:
            h = F.interpolate(self.reduce[t](feats[t]), size=fine.shape[-2:], mode="bilinear", align_corners=False)
            pred = self.heads[t](h + fine)
            if self.output_stride == 1:
                pred = F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out[t] = pred
        return out

    def extra_losses(self) -> dict[str, torch.Tensor]:
        if self.balance_weight <= 0 or not self.training:
            return {}
        terms = [v for v in (b.balance_loss() for b in self.blocks) if v is not None]
        return {"balance": self.balance_weight * sum(terms)} if terms else {}


# --------------------------------------------------------------------------- variants


def _student(defaults: dict[str, Any], tasks: Sequence[Task], kw: dict[str, Any]) -> StudentMTL:
    return StudentMTL(tasks, **{**defaults, **kw})


@register_model
def student_xs(*, tasks: Sequence[Task], **kw: Any) -> StudentMTL:
    """MobileNetV4-conv-small, C=48, one expert block: <= 0.4 GMACs (NYUD 4 tasks, 256x320)."""
    defaults = {"backbone": "mobilenetv4_conv_small", "width": 48, "head_width": 24, "ranks": (4, 4, 4, 4)}
    return _student({**defaults, "task_rank": 4, "generic_rank": 4, "num_blocks": 1}, tasks, kw)


@register_model
def student_s(*, tasks: Sequence[Task], **kw: Any) -> StudentMTL:
    """MobileNetV3-large-1.0, C=64, two expert blocks: <= 1 GMAC (NYUD 4 tasks, 256x320)."""
    defaults = {"backbone": "mobilenetv3_large_100", "width": 64, "head_width": 32, "ranks": (4, 4, 8, 8)}
    return _student({**defaults, "task_rank": 4, "generic_rank": 4, "num_blocks": 2}, tasks, kw)


@register_model
def student_m(*, tasks: Sequence[Task], **kw: Any) -> StudentMTL:
    """EfficientNet-Lite0, C=96, two expert blocks."""
    defaults = {"backbone": "efficientnet_lite0", "width": 96, "head_width": 48, "ranks": (8, 8, 8, 8)}
    return _student({**defaults, "task_rank": 8, "generic_rank": 8, "num_blocks": 2}, tasks, kw)
