"""Teacher sizes: parameters and GMACs of the paper-size teachers, against the papers' figures.

Every model is built on the META device (no weights are allocated, so ViT-L
teachers are counted in seconds on a laptop) and counted at batch 1 with
heads, in eval mode, with :func:`edgemt.models.profile.count_macs`
(``torch.utils.flop_counter.FlopCounterMode``: convolutions, linear layers and
matmuls including the attention products; FLOPs / 2). That is the convention
the official figures follow: with it, the training form of our MLoRE lands
within 0.05% of them.

Columns:

* ``gmacs`` / ``merged_gmacs``: everything the forward pass multiplies, in the
  training form and in the ``dynamic-merge`` form.
* ``kernel_gen_gmacs``: of the merged figure, the per-image generation of the
  merged kernels (the einsum of the gates with the bank of merged expert
  kernels: E * C * C * k^2 per task, block and image). The official
  measurement does not contain it: the official code sums the kernels with
  elementwise multiply-adds in a Python loop, which no MAC counter sees.
  ``merged_vs_official`` compares ``merged_gmacs - kernel_gen_gmacs``.
* ``no_cls_*``: the same model with a ViT without a class token, as the
  official code runs it (it adds ``pos_embed[:, 1:]`` to the patch tokens
  only). Our default keeps timm's class token so that timm checkpoints load
  unchanged; that one token costs about 0.4 GMACs at ViT-L size.

    python benchmarks/teacher_sizes.py            # ViT-L (with references), ViT-B, ViT-S
    python benchmarks/teacher_sizes.py --models mlore-vitl-nyud
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from _common import RESULTS, print_table, write_json

from edgemt.models.mlore import (
    MLoRE,
    mlore_vitb_nyud,
    mlore_vitb_pascal,
    mlore_vitl_nyud,
    mlore_vitl_pascal,
    mlore_vits_nyud,
    mlore_vits_pascal,
)
from edgemt.models.profile import count_macs, count_params
from edgemt.tasks import resolve_tasks

PASCAL = (["semseg", "human_parts", "saliency", "normals", "edge"], {"semseg": 21, "human_parts": 7})
NYUD = (["semseg", "depth", "normals", "edge"], {"semseg": 40})

# name -> (builder, dataset, input size, official figures: params (M), GMACs training form, GMACs merged)
TEACHERS: dict[str, tuple[Callable[..., MLoRE], tuple, tuple[int, int], dict[str, float] | None]] = {
    "mlore-vitl-pascal": (mlore_vitl_pascal, PASCAL, (512, 512), {"params_m": 407.7, "gmacs": 826.6, "merged": 613.3}),
    "mlore-vitl-nyud": (mlore_vitl_nyud, NYUD, (448, 576), {"params_m": 551.6, "gmacs": 1405.8, "merged": 926.2}),
    "mlore-vitb-pascal": (mlore_vitb_pascal, PASCAL, (512, 512), None),
    "mlore-vitb-nyud": (mlore_vitb_nyud, NYUD, (448, 576), None),
    "mlore-vits-pascal": (mlore_vits_pascal, PASCAL, (512, 512), None),
    "mlore-vits-nyud": (mlore_vits_nyud, NYUD, (448, 576), None),
}

NO_CLASS_TOKEN = {"class_token": False, "global_pool": ""}  # timm needs a pool other than "token" without it


def _kernel_generation_macs(model: MLoRE, batch: int = 1) -> int:
    """MACs of the per-image kernel generation of the dynamic-merge form.

    Each block and task computes ``einsum("be,eoikl->boikl")``: B * E * C * C * k^2 MACs
    (FlopCounterMode counts it as the equivalent bmm).
    """
    total = 0
    for blk in model.moe_blocks():
        e, c, k = len(blk.ranks), blk.channels, blk.merged_kernel
        total += batch * len(blk.task_names) * e * c * c * k * k
    return total


def measure(name: str, backbone_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    build, (task_names, classes), size, _ = TEACHERS[name]
    tasks = resolve_tasks(task_names, classes)
    with torch.device("meta"):
        model = build(tasks=tasks, backbone_kwargs=backbone_kwargs or {})
    model.eval()
    params = count_params(model)
    macs = count_macs(model, size, device="meta")
    model.set_form("dynamic-merge")
    merged = count_macs(model, size, device="meta")
    kernel_gen = _kernel_generation_macs(model)
    return {
        "params_m": params / 1e6,
        "gmacs": macs / 1e9,
        "merged_gmacs": merged / 1e9,
        "kernel_gen_gmacs": kernel_gen / 1e9,
    }


def _rel(ours: float, ref: float) -> str:
    return f"{100 * (ours - ref) / ref:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--out", default=str(RESULTS / "teacher_sizes.json"))
    args = ap.parse_args()

    rows, results = [], {}
    for name in args.models:
        _, (task_names, _), size, ref = TEACHERS[name]
        ours = measure(name)
        no_cls = measure(name, NO_CLASS_TOKEN)
        merged_net = ours["merged_gmacs"] - ours["kernel_gen_gmacs"]
        entry: dict[str, Any] = {
            "input_size": list(size),
            "tasks": task_names,
            **ours,
            "merged_without_kernel_gen_gmacs": merged_net,
            "no_cls_params_m": no_cls["params_m"],
            "no_cls_gmacs": no_cls["gmacs"],
            "no_cls_merged_without_kernel_gen_gmacs": no_cls["merged_gmacs"] - no_cls["kernel_gen_gmacs"],
            "official": ref,
        }
        row = {
            "model": name,
            "input": f"{size[0]}x{size[1]}",
            # Strings: print_table would round floats to 4 significant digits.
            "params_M": f"{ours['params_m']:.2f}",
            "GMACs": f"{ours['gmacs']:.1f}",
            "merged": f"{ours['merged_gmacs']:.1f}",
            "kernel_gen": f"{ours['kernel_gen_gmacs']:.2f}",
            "merged-kgen": f"{merged_net:.1f}",
            "no_cls GMACs": f"{no_cls['gmacs']:.1f}",
            "no_cls merged-kgen": f"{entry['no_cls_merged_without_kernel_gen_gmacs']:.1f}",
        }
        if ref:
            rel = {
                "params": _rel(ours["params_m"], ref["params_m"]),
                "gmacs": _rel(ours["gmacs"], ref["gmacs"]),
                "merged": _rel(merged_net, ref["merged"]),
                "no_cls_gmacs": _rel(no_cls["gmacs"], ref["gmacs"]),
                "no_cls_merged": _rel(entry["no_cls_merged_without_kernel_gen_gmacs"], ref["merged"]),
            }
            entry["relative_difference"] = rel
            row.update(
                {
                    "official params/GMACs/merged": f"{ref['params_m']}/{ref['gmacs']}/{ref['merged']}",
                    "d params": rel["params"],
                    "d GMACs": rel["gmacs"],
                    "d merged": rel["merged"],
                    "d no_cls GMACs": rel["no_cls_gmacs"],
                    "d no_cls merged": rel["no_cls_merged"],
                }
            )
        rows.append(row)
        results[name] = entry
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(
        "\nCounted with FlopCounterMode on the meta device, batch 1, heads included. 'merged' counts the\n"
        "per-image kernel generation (kernel_gen); the official figure does not (elementwise sums in a\n"
        "Python loop), so 'd merged' compares merged - kernel_gen. 'no_cls': without the ViT class token,\n"
        "as the official backbone runs."
    )
    write_json(args.out, {"convention": "FlopCounterMode MACs (FLOPs/2), batch 1, eval, meta device", **results})


if __name__ == "__main__":
    main()
