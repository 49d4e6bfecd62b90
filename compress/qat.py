"""Int8 quantization-aware training with PyTorch 2 export quantization (torchao pt2e).

Why pt2e and not NNCF: the TFLite int8 target is built by litert-torch from a
pt2e-quantized graph, so a pt2e QAT graph converts to TFLite with its learned
scales as they are; the same converted graph exports to ONNX as QDQ
(``QuantizeLinear``/``DequantizeLinear`` with the learned scales) for ONNX
Runtime. One quantized graph therefore feeds both int8 runtimes, with no
second calibration. NNCF would add its own graph representation and a C++
extension build for the same scheme.

The scheme is litert-torch's ``PT2EQuantizer`` in QAT mode: int8 per-channel
symmetric weights, int8 per-tensor activations (moving-average min/max fake
quantization), softmax/sigmoid outputs pinned to TFLite's fixed parameters.
Weights are learned within [-63, 63] by default (``qat.weight_bits: 7``), the
range ONNX Runtime's x86 int8 kernels without VNNI need: with the full range,
the ONNX file rounded every learned weight a second time to 7 bits, and on
three demo-sized runs the QAT file then scored 0.8 to 1.1 points of Delta_m
below the post-training file.

The model is quantized *after* reparameterization: BatchNorm is folded and
the low-rank expert blocks are in their static deploy form, so the graph that
is trained is the graph that is deployed (quantizing before folding would
learn scales for weights that folding then changes). The tasks' outputs stay
raw: the L2 normalisation of normals and every other activation run after
the graph, so no division is quantized (a quantized DIV fails in LiteRT).

:class:`QATModel` wraps the prepared graph behind the model interface
(``forward(x) -> {task: raw}``, ``.tasks``), so the trainer and the
distillation loss use it like any student. The graph is exported with a
dynamic batch and height/width in multiples of 32. With ``output_stride``
4 the graph ends at the heads' stride-4 maps (the graph the exporters
ship, see ``deploy.output_stride``) and :meth:`QATModel.forward`
upsamples them in float, outside the quantized graph, for the losses.

Artifacts without pickle: ``save_qat`` writes the float model (the QAT-trained
weights, ``arch.json`` + ``weights.safetensors``, loadable by ``load_model``),
the fake-quantization state (scales, zero points, observed ranges) in
``qat.safetensors``, and ``qat.json``. ``load_qat`` rebuilds the same graph
from the float model (export + prepare are deterministic) and loads the state
into it, checking that every key matches.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgemt.errors import ConfigError, DataError
from edgemt.io import load_weights, read_json, save_weights, write_json
from edgemt.models import graph_output_stride

__all__ = ["QATModel", "save_qat", "load_qat", "QAT_SCHEME", "is_qat_dir"]

QAT_FILE = "qat.safetensors"
QAT_META = "qat.json"
QAT_SCHEME = {
    "method": "quantization-aware training, torchao pt2e (litert-torch PT2EQuantizer, QAT mode)",
    "weights": "int8, per-channel, symmetric (learned with the weights; range per qat.weight_bits)",
    "activations": "int8, per-tensor, asymmetric (moving-average min/max fake quantization)",
}


class _Named(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(image)
        return {n: out[n] for n in self.names}


def _is_fake_quant_key(key: str) -> bool:
    return "activation_post_process" in key


class QATModel(nn.Module):
    """A float model prepared for QAT (fake-quantized pt2e graph) behind the model interface.

    Args:
        model: a multi-task model with ``.tasks`` (reparameterized: BN folded, static form).
        input_size: ``(H, W)`` of the example input used to export (any multiple of 32 runs).
    """

    def __init__(
        self, model: nn.Module, input_size: tuple[int, int], output_stride: int = 1, weight_bits: int = 7
    ) -> None:
        super().__init__()
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        from edgemt.targets.tflite import _int8_quantizer

        if weight_bits not in (7, 8):
            raise ConfigError(f"qat.weight_bits must be 7 or 8, got {weight_bits}")
        self.tasks = list(model.tasks)
        self.task_names = [t.name for t in self.tasks]
        self.registry_name = getattr(model, "registry_name", "")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self._arch = model.arch() if callable(getattr(model, "arch", None)) else None
        model = model.eval()
        dims = {
            0: torch.export.Dim("batch", min=1, max=1024),
            2: 32 * torch.export.Dim("h32", min=1, max=128),
            3: 32 * torch.export.Dim("w32", min=1, max=128),
        }
        example = torch.randn(2, 3, *self.input_size, device=next(model.parameters()).device)
        self.output_stride = int(output_stride)
        with graph_output_stride(model, self.output_stride):
            program = torch.export.export(
                _Named(model, self.task_names), (), {"image": example}, dynamic_shapes={"image": dims}
            )
        self.weight_bits = int(weight_bits)
        self.quantizer = _int8_quantizer(qat=True, weight_bits=self.weight_bits)
        self.graph = prepare_qat_pt2e(program.module(), self.quantizer)
        move_exported_model_to_eval(self.graph)
        self.training = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise DataError(f"the QAT graph takes heights and widths in multiples of 32, got {h}x{w}")
        out = self.graph(image=x)
        if self.output_stride == 1:
            return out
        return {k: F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False) for k, v in out.items()}

    def train(self, mode: bool = True) -> QATModel:
        # An exported graph refuses .train()/.eval(); pt2e switches its fake-quant modules itself.
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.training = mode
        return self

    def extra_losses(self) -> dict[str, torch.Tensor]:
        return {}

    def freeze_observers(self) -> None:
        """Stop updating the activation ranges (after training): the scales are then fixed."""
        for m in self.graph.modules():
            flag = getattr(m, "observer_enabled", None)
            if isinstance(flag, torch.Tensor):
                flag.fill_(0)

    def float_state(self) -> dict[str, torch.Tensor]:
        """The trained float weights under the wrapped model's own names (``load_state_dict`` ready)."""
        return {k[len("model.") :]: v for k, v in self.graph.state_dict().items() if k.startswith("model.")}

    def quant_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.graph.state_dict().items() if _is_fake_quant_key(k)}

    def converted(self, fold_weights: bool = False) -> torch.fx.GraphModule:
        """The int8 graph (quantize/dequantize ops with the learned parameters), in eval mode.

        ``fold_weights`` stores the weights as int8 constants (what an ONNX file should hold);
        litert-torch wants them unfolded and folds them itself.
        """
        from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        graph = copy.deepcopy(self.graph)
        move_exported_model_to_eval(graph)
        out = convert_pt2e(graph, fold_quantize=fold_weights)
        move_exported_model_to_eval(out)
        allow_exported_model_train_eval(out)
        return out


class ConvertedModel(nn.Module):
    """The converted int8 graph behind the model interface (what the int8 exporters take)."""

    def __init__(self, qat: QATModel, fold_weights: bool = False) -> None:
        super().__init__()
        self.graph = qat.converted(fold_weights)
        self.tasks = qat.tasks
        self.task_names = qat.task_names
        self.registry_name = qat.registry_name
        self.training = False

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.graph(image=image)

    def train(self, mode: bool = True) -> ConvertedModel:
        self.training = False  # an int8 graph has no training mode
        return self


def is_qat_dir(directory: str | Path) -> bool:
    return (Path(directory) / QAT_META).is_file() and (Path(directory) / QAT_FILE).is_file()


def save_qat(directory: str | Path, float_model: nn.Module, qat: QATModel, extra: dict[str, Any] | None = None) -> None:
    """Write the QAT-trained float model and the fake-quantization state (see the module docstring)."""
    from edgemt.models import save_model

    directory = Path(directory)
    float_model.load_state_dict(qat.float_state())
    save_model(directory, float_model)
    save_weights(directory / QAT_FILE, qat.quant_state())
    write_json(
        directory / QAT_META,
        {
            "input_size": list(qat.input_size),
            "output_stride": qat.output_stride,
            "weight_bits": qat.weight_bits,
            "scheme": QAT_SCHEME,
            "keys": len(qat.quant_state()),
            **(extra or {}),
        },
    )


def load_qat(directory: str | Path) -> tuple[nn.Module, QATModel]:
    """``(float model, QATModel)`` rebuilt from a QAT stage directory.

    Raises:
        DataError: missing files, or fake-quantization state that does not fit the rebuilt graph.
    """
    from edgemt.models import load_model

    directory = Path(directory)
    if not is_qat_dir(directory):
        raise DataError(f"{directory}: not a QAT artifact (no {QAT_META} / {QAT_FILE})")
    meta = read_json(directory / QAT_META)
    model = load_model(directory).eval()
    qat = QATModel(
        model,
        tuple(meta["input_size"]),
        output_stride=int(meta.get("output_stride", 1)),
        weight_bits=int(meta.get("weight_bits", 8)),  # saved before the field existed: full int8 range
    )
    state = load_weights(directory / QAT_FILE)
    want = set(qat.quant_state())
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:5], sorted(set(state) - want)[:5]
        raise DataError(
            f"{directory / QAT_FILE}: fake-quantization state does not fit the rebuilt graph "
            f"(missing {missing}, unexpected {extra}); a QAT stage saved by another EdgeMT or torchao version "
            "quantizes another set of ops: rerun the qat stage (edgemt pipeline <recipe> --force qat)"
        )
    qat.graph.load_state_dict(state, strict=False)
    qat.freeze_observers()
    return model, qat
