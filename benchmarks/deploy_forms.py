"""Latency of the low-rank expert block's deploy forms against a dense conv block.

Measured in one run, as ratios to a dense block of the same width (3x3 conv
with bias, ReLU, residual add: what the expert block's deploy forms compute
around their convs), in PyTorch (CPU, eager) and ONNX Runtime (CPU), 1 thread,
batch 1:

* one decoder block for one task (the unit the issue's goal is about) and the
  4-task block of the first decoder stage (shared input);
* the whole student in each form.

Goal (issue 4): the block in ``factorized`` form (all ranks, generic path
included, at most half the width) at most 0.7x the dense conv's latency, with
static weights; ``dynamic-merge`` about 1x; the training form clearly slower.

    python benchmarks/deploy_forms.py                 # C=64 and 128 at 1/8 of 256x320
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, print_table, write_json
from torch import nn

from edgemt.compress.reparam import calibrate_gates, reparameterize
from edgemt.models import create_model
from edgemt.models.student import LowRankExpertBlock
from edgemt.targets.latency import measure_latency
from edgemt.tasks import resolve_tasks

FORMS = ("training", "dynamic-merge", "factorized", "frozen-gate")
NYUD = ["semseg", "depth", "normals", "edge"]


class DenseBlock(nn.Module):
    """x + ReLU(conv3x3(x)): a dense conv block of the same width (BN folded into the bias)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class BlockOut(nn.Module):
    """An expert block as a tensor -> tensor(s) module, for timing and ONNX export."""

    def __init__(self, block: LowRankExpertBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor):
        out = self.block(x)
        return tuple(out[t] for t in self.block.task_names)


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)


def _time_torch(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = 10) -> float:
    with torch.inference_mode():
        return measure_latency(lambda: model(x), warmup=warmup, runs=runs)["median_ms"]


def _time_ort(model: nn.Module, x: torch.Tensor, runs: int, workdir: Path, name: str, warmup: int = 10) -> float:
    import onnxruntime as ort

    path = workdir / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), opset_version=18, dynamo=True, external_data=False, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return measure_latency(lambda: sess.run(None, feed), warmup=warmup, runs=runs)["median_ms"]


def _block_in_form(block: LowRankExpertBlock, form: str, x: torch.Tensor) -> nn.Module:
    b = copy.deepcopy(block).eval()
    if form == "frozen-gate":
        with torch.no_grad():
            b(x)
        b.frozen_gates.copy_(torch.stack([b.last_gates[t][0] for t in b.task_names]))
    b.set_form(form)
    return BlockOut(b).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--size", type=int, nargs=2, default=[256, 320], help="input HxW of the whole student")
    ap.add_argument(
        "--block-sizes",
        nargs="+",
        default=["256x320", "480x640"],
        help="input sizes HxW whose 1/8 grid the blocks run on (NYUD-v2's training and full size)",
    )
    ap.add_argument("--student", default="student-s")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "deploy_forms.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for size in args.block_sizes:
            ih, iw = (int(v) for v in size.lower().split("x"))
            h, w = ih // 8, iw // 8
            for c in args.widths:
                # Ranks at most C/2 in all: experts C/16, C/16, C/8, C/8 + task C/16 + generic C/16 = 6C/16.
                r = max(1, c // 16)
                x = torch.randn(1, c, h, w)
                dense = DenseBlock(c).eval()
                base_pt = _time_torch(dense, x, args.runs)
                base_ort = _time_ort(dense, x, args.runs, workdir, f"dense{c}")
                where = f"C={c} at {h}x{w}"
                rows.append(_row(f"dense 3x3 conv {where}", "-", base_pt, base_ort, base_pt, base_ort))
                for tasks in (["semseg"], NYUD):
                    blk = LowRankExpertBlock(tasks, c, [r, r, 2 * r, 2 * r], r, r)
                    _randomize_bn(blk)
                    for form in FORMS:
                        m = _block_in_form(blk, form, x)
                        pt = _time_torch(m, x, args.runs)
                        ort_ms = _time_ort(m, x, args.runs, workdir, f"blk{c}{len(tasks)}{form}")
                        label = f"expert block {where}, {len(tasks)} task(s), ranks {6 * r + 2 * r}"
                        rows.append(_row(label, form, pt, ort_ms, base_pt * len(tasks), base_ort * len(tasks)))
        # The whole student at the input size.
        tasks = resolve_tasks(NYUD, {"semseg": 40})
        student = create_model(args.student, tasks=tasks)
        _randomize_bn(student)
        student.eval()
        xs = torch.randn(1, 3, *args.size)
        calib = [torch.randn(2, 3, *args.size) for _ in range(2)]
        ref_pt = ref_ort = None
        for form in FORMS:
            m = copy.deepcopy(student).eval()
            if form == "frozen-gate":
                calibrate_gates(m, calib)
            reparameterize(m, form, input_size=tuple(args.size), fold_bn=True)
            pt = _time_torch(m, xs, args.runs)
            ort_ms = _time_ort(m, xs, args.runs, workdir, f"student{form}")
            if ref_pt is None:
                ref_pt, ref_ort = pt, ort_ms
            rows.append(_row(f"{args.student} (whole model, BN folded)", form, pt, ort_ms, ref_pt, ref_ort))
    print_table(rows, list(rows[0]))
    write_json(args.out, {"input_size": args.size, "threads": 1, "batch": 1, "rows": rows})


def _row(what: str, form: str, pt: float, ort_ms: float, ref_pt: float, ref_ort: float) -> dict:
    return {
        "what": what,
        "form": form,
        "torch_ms": round(pt, 4),
        "ort_ms": round(ort_ms, 4),
        "torch_ratio": round(pt / ref_pt, 3),
        "ort_ratio": round(ort_ms / ref_ort, 3),
    }


if __name__ == "__main__":
    main()
