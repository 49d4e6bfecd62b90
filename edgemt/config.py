"""Typed recipes: dataclasses loaded from YAML with strict validation.

``load_recipe("demo")`` reads ``edgemt/recipes/demo.yaml`` shipped inside the
package; any other argument is a path. Unknown keys and bad values raise
:class:`~edgemt.errors.ConfigError` naming the field's path (``train.lr``) and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from edgemt.errors import ConfigError
from edgemt.tasks import TASKS

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "ExportConfig",
    "ValidateConfig",
    "Recipe",
    "load_recipe",
    "list_recipes",
    "from_dict",
    "to_dict",
]


@dataclasses.dataclass
class SynthConfig:
    """Synthetic scene generation (used when ``dataset: synthetic``)."""

    train: int = 400
    val: int = 100
    size: tuple[int, int] = (96, 128)
    seed: int = 0


@dataclasses.dataclass
class DataConfig:
    dataset: Literal["synthetic", "nyud", "pascal"] = "synthetic"
    root: str = "data/synthetic"
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["semseg", "depth", "normals", "edge"])
    # Training crop (H, W); the validation split is padded to a multiple of ``pad_to``.
    crop: tuple[int, int] = (96, 128)
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: bool = True
    pad_to: int = 32
    # Pad validation images to exactly this (H, W) instead (fixed-grid models, e.g. PASCAL at 512x512).
    eval_size: tuple[int, int] | None = None
    workers: int = 0
    # Keep decoded samples in memory up to this many MiB per process (0: decode every access).
    cache_mb: float = 1024.0
    synth: SynthConfig = dataclasses.field(default_factory=SynthConfig)


@dataclasses.dataclass
class ModelConfig:
    name: str = "baseline-s"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    schedule: Literal["poly", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0
    clip_grad: float = 10.0
    amp: Literal["auto", "bf16", "off"] = "auto"
    # GPU speed options (ignored on CPU): NHWC memory layout for convs, torch.compile, TF32 matmuls.
    channels_last: bool = False
    compile: bool = False
    tf32: bool = True
    seed: int = 0
    # Deterministic kernels on GPU (exact resume there too, somewhat slower); CPU is always deterministic.
    deterministic: bool = False
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    # Per-task loss weights; tasks not named use the registry default.
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # Positive-class weight of the edge BCE (MLoRE: 0.88 NYUD, 0.925 PASCAL; registry default 0.95).
    edge_pos_weight: float | None = None
    max_minutes: float = 0.0  # 0: no wall-clock limit; else stop after this long
    # > 0: train for exactly this many minutes, the schedule following elapsed time instead of
    # steps (``steps`` is then only an upper bound); for comparisons at equal wall-clock budgets.
    time_budget_minutes: float = 0.0


@dataclasses.dataclass
class DistillConfig:
    """Teacher -> student distillation (the ``student`` stage; see edgemt.compress.distill)."""

    temperature: float = 2.0  # semseg / human_parts KL temperature (the term is scaled by T^2)
    # Per-task weight of the output KD term, multiplied by the task's loss weight (default 1).
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    gt_weight: float = 1.0  # weight of the ground-truth losses (0: pure distillation)
    feature_weight: float = 0.0  # feature imitation on the heads' inputs through 1x1 adapters (0: off)
    feature_loss: Literal["mse", "cwd"] = "mse"
    cwd_tau: float = 4.0  # temperature of channel-wise distillation
    teacher: bool = True  # false: train the student on ground truth only (the no-KD control)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig())

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature: expected > 0, got {self.temperature}")
        if self.cwd_tau <= 0:
            raise ConfigError(f"distill.cwd_tau: expected > 0, got {self.cwd_tau}")
        if any(w < 0 for w in (self.gt_weight, self.feature_weight, *self.weights.values())):
            raise ConfigError("distill: weights must be >= 0")


@dataclasses.dataclass
class DeployConfig:
    """Reparameterization of the student for deployment (the ``deploy`` stage)."""

    form: Literal["training", "dynamic-merge", "factorized", "frozen-gate"] = "factorized"
    fold_bn: bool = True
    calibration_batches: int = 20  # frozen-gate: training batches averaged into the frozen gates
    finetune_steps: int = 0  # frozen-gate: brief fine-tune with the gates frozen, before folding
    finetune_lr: float = 2.0e-4
    # Where the exported graph ends: 1 = outputs at the input size; 4 = the heads' stride-4 maps, upsampled
    # by the host (students only; validation upsamples them exactly as the graph would, and times it apart).
    output_stride: Literal[1, 4] = 1


@dataclasses.dataclass
class PruneConfig:
    """Structured pruning of the student (the ``prune`` stage). Exactly one budget may be set."""

    macs_ratio: float | None = 0.5  # keep at most this fraction of the student's MACs
    macs: int | None = None  # or: at most this many MACs (at data.crop)
    latency_ms: float | None = None  # or: until the model measures at most this on latency_target
    latency_target: Literal["onnx-fp32", "onnx-int8"] = "onnx-fp32"  # ONNX Runtime, validate.threads threads
    # Channel importance, ranked globally across layers: lamp (layer-adaptive magnitude; measured best on the
    # demo student without fine-tuning: -71 Δm points at half the MACs, against -134 for plain magnitude),
    # magnitude (group L2 norm), bn-scale (network slimming).
    importance: Literal["lamp", "magnitude", "bn-scale"] = "lamp"
    global_ranking: bool = True  # false: every layer loses the same fraction of channels
    # Latency-aware ranking: importance / cost ** latency_weight, a channel's cost being the MACs plus
    # element_weight x the output activations it saves (full-resolution layers cost more than their MACs
    # say in int8). 0: importance alone.
    latency_weight: float = 0.0
    element_weight: float = 200.0
    # Wide layers (min(2 * round_to, min_channels) channels or more) keep at least this many; narrower
    # ones are the low-rank experts' ranks and step by rank_round.
    min_channels: int = 16
    max_steps: int = 100  # pruning schedule: step i removes up to max_ratio * i / max_steps of the channels
    max_ratio: float = 0.9
    # Widths round to multiples of this. 16 matches ONNX Runtime's int8 kernels on x86 (blocks of 16
    # channels: 56 channels ran slower than 64, 40 slower than 48); 8 keeps a finer MACs grid.
    round_to: int = 8
    # Before ranking, bring widths the architecture set off that grid onto it (their least important
    # channels go): a group the ranking never reaches (student-xs's 24-channel heads) would stay off it.
    snap_to_grid: bool = False
    rank_round: int = 2  # low-rank expert ranks round to multiples of this
    measure_every: int = 5  # latency budget: pruning steps between measurements
    finetune_every: int = 0  # pruning steps between distillation fine-tunes (0: only once, at the end)
    # Or (MACs budgets): this many fine-tunes, evenly spaced in MACs between the start and the budget, so the
    # fine-tuning does not depend on how many steps a ranking takes.
    finetune_rounds: int = 0
    finetune_steps: int = 100  # training steps of each fine-tune during pruning
    final_finetune_steps: int = 600  # distillation fine-tune after the budget is met
    finetune_lr: float = 1.0e-3


@dataclasses.dataclass
class QATConfig:
    """Int8 quantization-aware training of the reparameterized student (the ``qat`` stage)."""

    steps: int = 300  # distillation steps with fake quantization (batch size: distill.train.batch_size)
    lr: float = 1.0e-4
    # Weight range learned: 7 keeps the int8 weights within [-63, 63], what ONNX Runtime's x86 int8 kernels
    # without VNNI need, so the onnx-int8 file holds the learned weights as they are; 8 uses the full range
    # (TFLite and Core ML keep it; onnx-int8 then requantizes it to 7 bits at export, a rounding QAT never saw).
    weight_bits: Literal[7, 8] = 7


@dataclasses.dataclass
class ParityThresholds:
    """Per-precision agreement between an exported artifact and its PyTorch model."""

    semseg_agreement: float = 0.99  # fraction of pixels with the same argmax
    depth_rel_err: float = 0.01  # mean |a-b| / b over valid pixels
    normals_deg: float = 1.0  # mean angle between the two predictions
    edge_f: float = 0.95  # boundary F of one thresholded map against the other
    saliency_agreement: float = 0.99
    human_parts_agreement: float = 0.99


@dataclasses.dataclass
class ExportConfig:
    targets: list[str] = dataclasses.field(default_factory=lambda: ["onnx-fp32"])
    opset: int = 18
    batch: int = 1
    # (H, W) of the exported graph; default: the padded size of the validation images.
    input_size: tuple[int, int] | None = None
    # int8 targets: training images (eval transform, in split order) that calibrate activation ranges.
    calibration_images: int = 64
    # TFLite converter: litert-torch (PyTorch -> TFLite) or onnx2tf (ONNX -> TF SavedModel -> TFLiteConverter).
    tflite_converter: Literal["litert-torch", "onnx2tf"] = "litert-torch"
    # onnx-int8: precision of the conv that reads the image. float (the usual first-layer exception): the image
    # is not quantized, and with a pruned 16-channel stem ONNX Runtime's float kernel is also the faster one.
    int8_input_conv: Literal["int8", "float"] = "float"


@dataclasses.dataclass
class ValidateConfig:
    threads: int = 1
    warmup: int = 5
    runs: int = 30
    max_images: int = 0  # 0: the whole validation split
    parity: dict[str, ParityThresholds] = dataclasses.field(
        default_factory=lambda: {
            "fp32": ParityThresholds(),
            # fp16 weights (TFLite) or fp16 compute (Core ML on a Mac): rounding at class borders only.
            "fp16": ParityThresholds(
                semseg_agreement=0.98,
                depth_rel_err=0.02,
                normals_deg=2.0,
                edge_f=0.85,
                saliency_agreement=0.98,
                human_parts_agreement=0.98,
            ),
            # Core ML int8 weights with fp16 activations: between fp16 and full int8.
            "int8w": ParityThresholds(
                semseg_agreement=0.95,
                depth_rel_err=0.03,
                normals_deg=3.0,
                edge_f=0.8,
                saliency_agreement=0.95,
                human_parts_agreement=0.95,
            ),
            # 4-bit palettized weights (16 values per tensor) move predictions more than int8.
            "pal4": ParityThresholds(
                semseg_agreement=0.85,
                depth_rel_err=0.08,
                normals_deg=8.0,
                edge_f=0.6,
                saliency_agreement=0.85,
                human_parts_agreement=0.85,
            ),
            # Post-training int8 moves argmaxes at class borders and shifts regressions by a few percent.
            "int8": ParityThresholds(
                semseg_agreement=0.9,
                depth_rel_err=0.05,
                normals_deg=5.0,
                edge_f=0.7,
                saliency_agreement=0.9,
                human_parts_agreement=0.9,
            ),
        }
    )


@dataclasses.dataclass
class Recipe:
    name: str = "demo"
    runs_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    student: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig("student-xs"))
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    deploy: DeployConfig = dataclasses.field(default_factory=DeployConfig)
    qat: QATConfig = dataclasses.field(default_factory=QATConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    pipeline: list[str] = dataclasses.field(default_factory=lambda: ["data", "teacher", "export", "validate", "report"])

    def __post_init__(self) -> None:
        for i, t in enumerate(self.data.tasks):
            if t not in TASKS:
                raise ConfigError(f"data.tasks[{i}]: unknown task {t!r}; allowed: {sorted(TASKS)}")
        if not self.data.tasks:
            raise ConfigError(f"data.tasks: empty; allowed: {sorted(TASKS)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# --------------------------------------------------------------------------- generic loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {_fields(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args
        return {_convert(k, kt, path): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    names = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        p = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{p}: unknown key; allowed keys here: {names}")
        kwargs[key] = _convert(value, hints[key], p)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain JSON/YAML-able values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def list_recipes() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("edgemt.recipes").iterdir() if p.name.endswith(".yaml")
    )


def load_recipe(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load a shipped recipe by name, a YAML file by path, or a run directory's ``recipe.yaml``.

    ``overrides`` maps dotted paths (``train.steps``) to values, applied before
    validation.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key or bad value.
    """
    p = Path(name_or_path)
    if p.is_dir():  # a run directory: the recipe it was run with
        if not (p / "recipe.yaml").is_file():
            raise ConfigError(f"{p}: a directory without recipe.yaml; expected a run directory or a recipe file")
        p = p / "recipe.yaml"
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file does not exist")
        text, source = p.read_text(), str(p)
    else:
        res = resources.files("edgemt.recipes") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"{name_or_path!r} is neither a recipe file nor a shipped recipe; shipped: {list_recipes()}"
            )
        text, source = res.read_text(), f"recipe {name_or_path!r}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    try:
        return from_dict(Recipe, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
