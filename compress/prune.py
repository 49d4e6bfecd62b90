"""Structured pruning of a multi-task model to a MACs or measured-latency budget (Torch-Pruning).

:func:`prune_to_budget` removes whole channels with Torch-Pruning's
``MetaPruner``: global ranking (one threshold across all layers) of a group
importance, in many small iterative steps, until the budget is met. The
importance is LAMP by default (L2 magnitudes rescaled per layer so that scores
are comparable across layers of different scales; on the demo student, half
the MACs pruned without fine-tuning cost 71 points of Δm with LAMP against 134
with plain group magnitude), or ``magnitude`` or ``bn-scale``. The budget:

* ``macs_ratio`` (keep this fraction of the model's MACs) or ``macs``
  (absolute): followed group by group, so the result lands just under the
  budget (steps are small: ``max_ratio / max_steps`` of the channels each).
  Conv and linear MACs are recomputed from the layers' widths after every
  group (no forward pass); an exact ``count_macs`` confirms each decision.
  Counting exactly after every group was 92% of the pruning time.
* ``latency_ms``: ``latency_fn(model)`` measures the model on a local target
  (e.g. ONNX Runtime, 1 thread) every ``measure_every`` steps; pruning stops at
  the first measurement under the budget.

``latency_weight > 0`` divides every group's importance by its cost per
channel to that power (:class:`_CostWeighted`: MACs plus ``element_weight``
times the activations written), so full-resolution layers, which dominate int8
latency for few MACs, are pruned before the cheap low-resolution ones.
``min_channels`` is the floor of every wide layer.

``finetune(model, round)`` is called every ``finetune_every`` steps, or, with
a MACs budget, ``finetune_rounds`` times at evenly spaced MACs (round i once
the model is ``i / (rounds + 1)`` of the way from its MACs to the budget), so
the network recovers between steps instead of all at once at the end (the
pipeline stage distils from the teacher there). Counting rounds in MACs keeps
the fine-tuning the same whichever ranking is used: a latency-aware ranking
that meets the budget in 50 steps got one round of ``finetune_every: 30``
where LAMP, in 85 steps, got two.

What is kept and what shrinks:

* every task head's output conv and every router's linear layer keep their
  outputs (the tasks' channels and the E+1 gate logits); their inputs shrink
  with the features they read;
* widths (backbone, neck, decoder) round to multiples of ``round_to`` (8 by
  default: what int8 and SIMD kernels like); the low-rank experts' ranks (the
  down-projection outputs, 4 to 8 channels) round to ``rank_round`` (2), and
  every layer keeps at least one step of channels, so no expert disappears.

The gate coupling trap: an expert block multiplies each expert's output
(B, C, H, W) by its gate (B, 1, 1, 1), a slice of the router's softmax.
Traced as is, the dependency graph ties the router's output channels to the
feature channels through that multiply. During tracing the gates are
detached and returned as extra outputs instead: the routers stay in the
graph (their input channels follow the features) without coupling, and their
outputs are ignored layers. A test checks that the blocks' widths and ranks
do shrink.

The pruned sizes are recorded on the model (``model.pruned_shapes``), so
``save_model`` writes them to ``arch.json`` and ``load_model`` rebuilds the
pruned model from the registry constructor plus the record, without pickle.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from edgemt.errors import ConfigError
from edgemt.models.profile import count_macs
from edgemt.models.shapes import layer_shapes, shape_diff

__all__ = ["prune_to_budget", "ignored_layers", "expert_widths"]


def _expert_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "route") and hasattr(m, "down")]


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are kept: each head's last conv, every router's linear layers."""
    keep: list[nn.Module] = []
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.ModuleDict):
        for head in heads.values():
            convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
            if convs:
                keep.append(convs[-1])
    for blk in _expert_blocks(model):
        keep.extend(m for m in blk.router.modules() if isinstance(m, nn.Linear))
    return keep


def expert_widths(model: nn.Module) -> list[dict[str, Any]]:
    """Per expert block: width, shared-expert ranks, task-expert ranks, generic rank."""
    out = []
    for blk in _expert_blocks(model):
        out.append(
            {
                "channels": int(blk.generic_up.out_channels),
                "expert_ranks": [int(d.out_channels) for d in blk.down],
                "task_ranks": {t: int(c.out_channels) for t, c in blk.task_down.items()},
                "generic_rank": int(blk.generic_down.out_channels),
            }
        )
    return out


@contextlib.contextmanager
def _detached_gates(model: nn.Module, sink: list[torch.Tensor]) -> Iterator[None]:
    """While tracing: routers return detached gates and append the live ones to ``sink``."""
    blocks = _expert_blocks(model)
    for blk in blocks:
        original = type(blk).route

        def route(self, t, x, _original=original):
            g, mix = _original(self, t, x)
            sink.extend((g, mix))
            return g.detach(), mix.detach()

        blk.route = types.MethodType(route, blk)
    try:
        yield
    finally:
        for blk in blocks:
            del blk.route


IMPORTANCES = ("magnitude", "lamp", "bn-scale")


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "magnitude":  # L2 norm of every weight a channel touches, mean over its group, mean-normalised
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "lamp":  # layer-adaptive magnitude: scores comparable across layers of different scales
        return tp.importance.LAMPImportance(p=2)
    if name == "bn-scale":  # network slimming: |gamma| of the BatchNorms
        return tp.importance.BNScaleImportance()
    raise ConfigError(f"prune.importance must be one of {IMPORTANCES}, got {name!r}")


class _MacsEstimate:
    """Conv and linear MACs from the layers' current widths, without a forward pass.

    Pruning changes channel counts, never spatial sizes, so each layer's output
    positions are recorded once (one forward with hooks) and its MACs are then
    ``positions * out * in / groups * kernel``. ``count_macs`` (FlopCounterMode)
    costs one slow dispatching forward a call, near a budget once per pruned
    group; this estimate costs microseconds. It is kept honest by anchoring it to
    an exact count: ``estimate = exact_at_anchor + (layers_now - layers_at_anchor)``,
    so MACs that are not in conv or linear layers (matmuls in functional code) are
    carried at their anchored value, and the budget decision is confirmed by an
    exact count before pruning stops.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        # Output positions per layer, summed over its calls (a layer run twice costs twice).
        self.positions: dict[nn.Module, int] = {}
        hooks = []

        def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            positions = out.numel() // (out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1])
            self.positions[mod] = self.positions.get(mod, 0) + positions

        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in hooks:
                h.remove()
        self.anchor_exact = 0
        self.anchor_layers = 0

    def layer_macs(self) -> int:
        total = 0
        for mod, positions in self.positions.items():
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                total += positions * mod.out_channels * (mod.in_channels // mod.groups) * kh * kw
            else:
                total += positions * mod.out_features * mod.in_features
        return total

    def anchor(self, exact: int) -> int:
        self.anchor_exact, self.anchor_layers = int(exact), self.layer_macs()
        return int(exact)

    def estimate(self) -> int:
        return self.anchor_exact + self.layer_macs() - self.anchor_layers


class _CostWeighted:
    """A group importance divided by the group's cost per channel to the power ``alpha`` (latency-aware).

    The cost of one channel of a group is what removing it saves, summed over the
    group's conv and linear layers: the MACs (``positions * in / groups * k*k``
    for a layer losing an output, ``positions * out * k*k`` for one losing an
    input) plus ``element_weight * positions`` for every output activation it no
    longer writes. Global ranking then trades a channel's importance against its
    cost: channels of the full-resolution layers (stem, first block, heads), which
    dominate int8 latency for few MACs, rank lower than their magnitude alone says.
    """

    def __init__(self, base: Any, positions: dict[nn.Module, int], alpha: float, element_weight: float) -> None:
        self.base, self.positions, self.alpha, self.element_weight = base, positions, alpha, element_weight

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        import torch_pruning as tp

        imp = self.base(group)
        if imp is None:
            return None
        out_fns = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)
        cost = 0.0
        for dep, _ in group:
            layer, fn = dep.layer, dep.pruning_fn
            pos = self.positions.get(layer)
            if pos is None:
                continue
            k = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else 1
            if fn in out_fns:
                fan_in = layer.in_channels // layer.groups if isinstance(layer, nn.Conv2d) else layer.in_features
                cost += pos * (fan_in * k + self.element_weight)
            elif fn == tp.prune_conv_in_channels and layer.groups == 1:
                cost += pos * layer.out_channels * k
            elif fn == tp.prune_linear_in_channels:
                cost += pos * layer.out_features
        return imp / max(cost, 1.0) ** self.alpha


def _pruner_class():
    import torch_pruning as tp

    class _Pruner(tp.pruner.MetaPruner):
        """MetaPruner whose rounding keeps low-rank layers (below two width steps) at ``rank_round``.

        Wider layers round to ``round_to`` and keep at least ``min_channels``.
        """

        rank_round = 2
        min_channels = 16

        def is_wide(self, channels: int, round_to: int) -> bool:
            """A width (``round_to``, floor ``min_channels``), not a low-rank expert's rank (``rank_round``).

            Wide from two width steps, or from the floor when that is lower: with ``round_to: 16`` a layer of
            24 channels is still a width (it goes to 16), not a rank pruned two channels at a time.
            """
            return channels >= min(2 * round_to, self.min_channels)

        def width_step(self, channels: int, round_to: int) -> int:
            """Channels removed at a time: ``round_to`` for widths, ``rank_round`` for ranks."""
            return round_to if self.is_wide(channels, round_to) else self.rank_round

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            step = self.width_step(current_channels, round_to)
            keep = current_channels - n_pruned
            keep = max(step, keep - keep % step)
            if self.is_wide(current_channels, round_to):
                keep = max(keep, min(current_channels, self.min_channels))
            return max(current_channels - keep, 0)

    return _Pruner


def _prune_in_chunks(pruner: Any, group: Any, round_to: int, done: Callable[[], bool]) -> None:
    """Prune ``group``'s channels a width step at a time, least important first, until ``done()``.

    Near a budget one group can hold many channels (a whole width group falling
    under the global threshold at once) and overshoot it by several percent;
    taking it in steps of ``round_to`` (``rank_round`` for low-rank layers) stops
    at the step that meets the budget. Groups with grouped channels (ch_groups > 1)
    are pruned whole.
    """
    dep, idxs = group[0]
    idxs = list(idxs)
    module, fn = dep.target.module, dep.handler
    width = pruner.DG.get_out_channels(module) if pruner.DG.is_out_channel_pruning_fn(fn) else None
    if width is None or pruner._get_channel_groups(group) != 1:
        group.prune()
        return
    step = pruner.width_step(width, round_to)
    if len(idxs) <= step:
        group.prune()
        return
    # The first chunk brings the width to a multiple of the step (a 40-channel layer at step 16 goes to
    # 32, then 16), so stopping early never leaves an off-grid width.
    size = width % step or step
    while idxs:
        part, idxs = idxs[:size], idxs[size:]
        size = step
        pruner.DG.get_pruning_group(module, fn, part).prune()
        # The remaining channels' indices shift down past the ones just removed.
        idxs = [i - sum(p < i for p in part) for i in idxs]
        if done():
            return


def _snap_to_grid(pruner: Any, round_to: int) -> list[dict[str, Any]]:
    """Bring every wide group whose width is off the ``round_to`` grid down onto it; returns what moved.

    The global ranking may never pick a group (a narrow, high-importance one such as the heads), so a
    width the architecture set off the grid (student-xs's 24-channel heads with ``round_to: 16``) would
    stay there, in the slow path of the int8 kernels the grid is for: on ONNX Runtime int8 (x86, 1
    thread) the four 24-channel heads of the pruned demo student ran 0.46 ms slower at 256x320 than the
    same heads at 16 channels (3.26 against 2.80 ms for the whole graph). Each such group loses its
    least important ``width % round_to`` channels by the pruner's own importance, if the floor
    ``min_channels`` allows; grouped-channel groups are left alone.
    """
    names = {m: n for n, m in pruner.model.named_modules()}
    moved = []
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        dep, _ = group[0]
        module, fn = dep.target.module, dep.handler
        if not pruner.DG.is_out_channel_pruning_fn(fn) or pruner._get_channel_groups(group) != 1:
            continue
        width = pruner.DG.get_out_channels(module)
        if width is None or not pruner.is_wide(width, round_to):
            continue
        extra = width % round_to
        if not extra or width - extra < pruner.min_channels:
            continue
        imp = pruner.estimate_importance(group)
        if imp is None:
            continue
        drop = torch.argsort(imp)[:extra].tolist()
        pruner.DG.get_pruning_group(module, fn, sorted(drop)).prune()
        moved.append({"layer": names.get(module, type(module).__name__), "from": width, "to": width - extra})
    return moved


def prune_to_budget(
    model: nn.Module,
    *,
    input_size: tuple[int, int],
    macs_ratio: float | None = None,
    macs: int | None = None,
    latency_ms: float | None = None,
    latency_fn: Callable[[nn.Module], float] | None = None,
    max_steps: int = 100,
    max_ratio: float = 0.9,
    round_to: int = 8,
    rank_round: int = 2,
    measure_every: int = 5,
    global_ranking: bool = True,
    importance: str = "lamp",
    latency_weight: float = 0.0,
    element_weight: float = 200.0,
    min_channels: int = 16,
    snap_to_grid: bool = False,
    finetune: Callable[[nn.Module, int], Any] | None = None,
    finetune_every: int = 0,
    finetune_rounds: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Prune ``model`` in place until it meets exactly one budget; returns what happened.

    Args:
        input_size: ``(H, W)`` of the example input (MACs are counted at this size).
        macs_ratio: keep at most this fraction of the current MACs (0 < r < 1).
        macs: keep at most this many MACs.
        latency_ms: stop when ``latency_fn(model)`` is at most this.
        max_steps, max_ratio: the pruning schedule: step i removes up to
            ``max_ratio * i / max_steps`` of the prunable channels (global ranking).
        latency_weight, element_weight: rank channels by importance / cost ** latency_weight, the cost being
            the MACs and ``element_weight`` x the activations one channel costs (see ``_CostWeighted``);
            0 ranks by importance alone.
        round_to: widths round to multiples of this. 16 suits ONNX Runtime's int8 kernels on x86 (AVX2),
            which work in blocks of 16 channels: a pointwise-depthwise-pointwise block of 48 channels ran in
            297 us, of 56 in 401 us, of 64 in 353 us, of 40 in 514 us.
        min_channels: no wide layer (``min(2 * round_to, min_channels)`` channels or more) goes below this
            many (int8 kernels slow down on very thin layers: a stem of 8 channels ran slower than one of
            16); narrower layers are the experts' ranks and step by ``rank_round``.
        snap_to_grid: first bring every wide width that is off the ``round_to`` grid onto it (its least
            important channels go; see ``_snap_to_grid``), so no layer the ranking never reaches stays off it.
        finetune: called as ``finetune(model, round)`` every ``finetune_every`` steps, or ``finetune_rounds``
            times at evenly spaced MACs on the way to a MACs budget (give one of the two).

    Returns:
        ``{"budget", "met", "steps", "macs_before", "macs_after", "macs_ratio", "latency_ms" (if measured),
        "history", "widths_before", "widths_after", "pruned_layers", "snapped_to_grid", "wall_s"}``.

    Raises:
        ConfigError: no budget, more than one, or an impossible value.
    """

    given = [k for k, v in (("macs_ratio", macs_ratio), ("macs", macs), ("latency_ms", latency_ms)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"prune: give exactly one budget of macs_ratio, macs, latency_ms (got {given or 'none'})")
    if macs_ratio is not None and not 0.0 < macs_ratio < 1.0:
        raise ConfigError(f"prune.macs_ratio must be in (0, 1), got {macs_ratio}")
    if latency_ms is not None and (latency_fn is None or latency_ms <= 0):
        raise ConfigError("prune.latency_ms needs a positive budget and a latency_fn (a local target to measure on)")
    if finetune_every < 0 or finetune_rounds < 0 or (finetune_every and finetune_rounds):
        raise ConfigError(
            "prune: give at most one of finetune_every and finetune_rounds, both >= 0, and set the other to 0 "
            f"(got finetune_every={finetune_every}, finetune_rounds={finetune_rounds})"
        )
    if finetune_rounds and latency_ms is not None:
        raise ConfigError(
            "prune.finetune_rounds spaces the fine-tunes in MACs and needs a MACs budget; "
            "with latency_ms use finetune_every"
        )
    if not 0.0 < max_ratio < 1.0 or max_steps < 1:
        raise ConfigError(f"prune: max_ratio must be in (0, 1) and max_steps >= 1 (got {max_ratio}, {max_steps})")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.randn(1, 3, *input_size, device=device)
    macs_before = count_macs(model, input_size)
    target_macs = int(macs_before * macs_ratio) if macs_ratio is not None else int(macs) if macs is not None else None
    if target_macs is not None and target_macs >= macs_before:
        raise ConfigError(f"prune: the model already has {macs_before:,} MACs <= the budget {target_macs:,}")
    shapes_before = layer_shapes(model)
    params_before = sum(p.numel() for p in model.parameters())
    widths_before = expert_widths(model)
    names = [t.name for t in getattr(model, "tasks", [])]

    gates: list[torch.Tensor] = []

    def forward_fn(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        gates.clear()
        out = m(x)
        outs = [out[n] for n in names] if isinstance(out, dict) and names else list(out.values())
        return outs + list(gates)

    if latency_weight < 0 or element_weight < 0 or min_channels < 1:
        raise ConfigError(
            "prune: latency_weight and element_weight must be >= 0 and min_channels >= 1 "
            f"(got {latency_weight}, {element_weight}, {min_channels})"
        )
    est = _MacsEstimate(model, example)
    imp = _importance(importance)
    if latency_weight > 0:
        imp = _CostWeighted(imp, est.positions, latency_weight, element_weight)
    pruner_cls = _pruner_class()
    pruner_cls.rank_round = int(rank_round)
    pruner_cls.min_channels = int(min_channels)
    with _detached_gates(model, gates):
        pruner = pruner_cls(
            model,
            example,
            importance=imp,
            global_pruning=global_ranking,
            pruning_ratio=max_ratio,
            iterative_steps=max_steps,
            ignored_layers=ignored_layers(model),
            round_to=round_to,
            forward_fn=forward_fn,
        )
    snapped: list[dict[str, Any]] = []
    if snap_to_grid and round_to > 1:
        with _detached_gates(model, gates):
            snapped = _snap_to_grid(pruner, round_to)
        for blk in _expert_blocks(model):
            blk.sync_shapes()
    history: list[dict[str, Any]] = []
    latency = latency_fn(model) if latency_fn is not None and latency_ms is not None else None
    history.append({"step": 0, "macs": macs_before, "latency_ms": latency})
    met = latency is not None and latency <= latency_ms
    steps = 0
    rounds = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, desc="prune", dynamic_ncols=True)
    now = est.anchor(macs_before)
    # MACs at which the fine-tune rounds run (finetune_rounds), highest first.
    round_at = (
        [macs_before - (macs_before - target_macs) * (i + 1) / (finetune_rounds + 1) for i in range(finetune_rounds)]
        if target_macs is not None
        else []
    )
    while not met and steps < max_steps:
        with _detached_gates(model, gates):
            # Group by group (interactive step): near a MACs budget, stop at the group that meets it, so
            # one coarse step (few large groups, or LAMP's jumps) cannot overshoot the budget. The cheap
            # estimate picks the group; an exact count confirms it (and re-anchors the estimate if not).
            for group in pruner.step(interactive=True):
                if target_macs is not None and est.estimate() < 1.5 * target_macs:
                    _prune_in_chunks(pruner, group, round_to, lambda: est.estimate() <= target_macs)
                else:
                    group.prune()
                if target_macs is not None and est.estimate() <= target_macs:
                    for blk in _expert_blocks(model):
                        blk.sync_shapes()
                    if est.anchor(count_macs(model, input_size)) <= target_macs:
                        break
        steps += 1
        for blk in _expert_blocks(model):
            blk.sync_shapes()
        now = est.estimate()
        if target_macs is None or now <= 1.2 * target_macs or steps % 10 == 0:  # exact where it decides
            now = est.anchor(count_macs(model, input_size))
        entry: dict[str, Any] = {"step": steps, "macs": now}
        if target_macs is not None:
            met = now <= target_macs
        elif steps % measure_every == 0 or steps == max_steps:
            entry["latency_ms"] = latency = latency_fn(model)
            met = latency <= latency_ms
        history.append(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(macs=f"{now / macs_before:.3f}", **({"ms": f"{latency:.2f}"} if latency else {}))
        due = finetune_every > 0 and steps % finetune_every == 0
        if round_at and now <= round_at[0]:  # a step that crosses two marks leaves one for the next step
            round_at.pop(0)
            due = True
        if finetune is not None and due and not met:
            finetune(model, rounds)
            rounds += 1
            model.eval()
    if bar is not None:
        bar.close()
    model.train(was_training)
    after = count_macs(model, input_size)
    diff = shape_diff(shapes_before, layer_shapes(model))
    model.pruned_shapes = {**(getattr(model, "pruned_shapes", None) or {}), **diff}
    budget: dict[str, Any] = {
        k: v for k, v in (("macs_ratio", macs_ratio), ("macs", macs), ("latency_ms", latency_ms)) if v is not None
    }
    if target_macs is not None:
        budget["target_macs"] = target_macs
    return {
        "budget": budget,
        "met": bool(met),
        "steps": steps,
        "finetune_rounds": rounds,
        "macs_before": int(macs_before),
        "macs_after": int(after),
        "macs_ratio": round(after / macs_before, 4),
        "latency_ms": latency,
        "history": history,
        "widths_before": widths_before,
        "widths_after": expert_widths(model),
        "pruned_layers": len(diff),
        "snapped_to_grid": snapped,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
