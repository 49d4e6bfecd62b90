"""Teacher throughput: training images/s and inference latency, per teacher.

On a GPU, at paper size with bf16 autocast (the recipe's setting); on a CPU,
the tiny variants in fp32. For models with low-rank expert blocks (MLoRE) it
also times each inference form, and the paper's batched ``dynamic-merge``
against the same form run image by image (what the official code's Python
loop over the batch amounts to), as a ratio measured in one run.

    python benchmarks/teacher_throughput.py                   # tiny, CPU
    python benchmarks/teacher_throughput.py --size paper      # paper size (needs a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from _common import RESULTS, print_table, write_json

from edgemt.models import create_model
from edgemt.models.profile import count_params
from edgemt.tasks import resolve_tasks
from edgemt.train.trainer import multitask_loss

NYUD = (["semseg", "depth", "normals", "edge"], {"semseg": 40})
MODELS = {
    "paper": [
        ("mlore-vitl-nyud", (448, 576)),
        ("taskexpert-vitl-nyud", (448, 576)),
        ("scamtl-hrnet18-nyud", (448, 576)),
    ],
    "tiny": [
        ("mlore-tiny", (64, 96)),
        ("taskexpert-tiny", (64, 96)),
        ("scamtl-tiny", (64, 96)),
        ("baseline-s", (64, 96)),
    ],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _labels(tasks, batch: int, size: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    h, w = size
    out = {}
    for t in tasks:
        if t.name in ("semseg", "human_parts"):
            out[t.name] = torch.randint(0, t.channels, (batch, h, w), device=device)
        elif t.name == "saliency":
            out[t.name] = torch.randint(0, 2, (batch, h, w), device=device)
        elif t.name == "depth":
            out[t.name] = torch.rand(batch, 1, h, w, device=device) * 5 + 0.5
        elif t.name == "normals":
            out[t.name] = torch.nn.functional.normalize(torch.randn(batch, 3, h, w, device=device), dim=1)
        else:
            out[t.name] = (torch.rand(batch, 1, h, w, device=device) > 0.9).float()
    return out


def bench_model(name: str, size: tuple[int, int], args, device: torch.device) -> list[dict]:
    tasks = resolve_tasks(*NYUD)
    torch.manual_seed(0)
    model = create_model(name, tasks=tasks, **({"img_size": size} if not name.startswith("baseline") else {}))
    model.to(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and not args.fp32
        else contextlib.nullcontext()
    )
    rows = []
    # ---- training throughput
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = multitask_loss(tasks, {})
    x = torch.randn(args.batch, 3, *size, device=device)
    labels = _labels(tasks, args.batch, size, device)

    def train_step() -> None:
        with autocast:
            out = model(x)
        loss, _ = loss_fn(out, labels, model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = _timed(train_step, device, args.warmup, args.steps)
    train_ips = args.batch / statistics.median(t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_step()
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        mem = float("nan")
    # ---- inference latency, per form
    model.eval()
    forms = ["training"]
    if hasattr(model, "set_form"):
        forms += ["dynamic-merge", "factorized"]
    x1 = torch.randn(1, 3, *size, device=device)
    xb = torch.randn(args.infer_batch, 3, *size, device=device)
    for form in forms:
        if hasattr(model, "set_form"):
            model.set_form(form)
        with torch.no_grad(), autocast:
            lat = _timed(lambda: model(x1), device, args.warmup, args.runs)
            batched = _timed(lambda: model(xb), device, args.warmup, max(3, args.runs // 4))
            row = {
                "model": name,
                "size": f"{size[0]}x{size[1]}",
                "params_M": count_params(model) / 1e6,
                "form": form,
                "train_img_s": train_ips,
                "train_mem_GiB": mem,
                "latency_b1_ms": 1e3 * statistics.median(lat),
                "p90_b1_ms": 1e3 * sorted(lat)[int(0.9 * (len(lat) - 1))],
                f"infer_img_s_b{args.infer_batch}": args.infer_batch / statistics.median(batched),
            }
            if form == "dynamic-merge":
                # The same form, image by image: what a Python loop over the batch costs.
                loop = _timed(
                    lambda: [model(xb[i : i + 1]) for i in range(xb.shape[0])], device, 1, max(3, args.runs // 4)
                )
                row["loop_over_batched"] = statistics.median(loop) / statistics.median(batched)
        rows.append(row)
    if hasattr(model, "set_form"):
        model.set_form("training")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "paper"], default=None, help="default: paper on GPU, tiny on CPU")
    ap.add_argument("--models", nargs="*", help="registry names (default: the three teachers at --size)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 4 paper / 8 tiny)")
    ap.add_argument("--infer-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size_kind = args.size or ("paper" if device.type == "cuda" else "tiny")
    args.batch = args.batch or (4 if size_kind == "paper" else 8)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = MODELS[size_kind]
    if args.models:
        sizes = dict(MODELS["paper"] + MODELS["tiny"])
        models = [(m, sizes.get(m, (64, 96))) for m in args.models]
    rows = []
    for name, size in models:
        print(f"... {name} at {size[0]}x{size[1]} on {device}", flush=True)
        rows.extend(bench_model(name, size, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print_table(rows, cols)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": "fp32" if args.fp32 or device.type != "cuda" else "bf16 autocast",
        "train_batch": args.batch,
        "infer_batch": args.infer_batch,
        "torch": torch.__version__,
    }
    print(info)
    write_json(args.out or RESULTS / f"teacher_throughput_{size_kind}_{device.type}.json", {**info, "rows": rows})


if __name__ == "__main__":
    main()
