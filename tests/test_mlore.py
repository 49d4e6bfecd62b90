"""MLoRE teacher: tiny forward/backward, gating, load balancing, deploy forms, ONNX, backbone weights.

Everything runs on ``mlore-tiny`` at 32x48 (a 2x3 feature grid) with fixed
seeds; the paper-size check builds on the meta device (no allocation).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from edgemt.errors import ConfigError, DataError
from edgemt.models.mlore import (
    MLoRE,
    cv_squared,
    load_balance_loss,
    mlore_tiny,
    mlore_vitl_nyud,
    mlore_vitl_pascal,
    noisy_top_k_gates,
)
from edgemt.models.profile import count_params
from edgemt.models.registry import create_model, load_model, save_model
from edgemt.tasks import resolve_tasks

H, W = 32, 48
NYUD = ["semseg", "depth", "normals", "edge"]
PASCAL = ["semseg", "human_parts", "saliency", "normals", "edge"]
CLASSES = {"NYUD": {"semseg": 40}, "PASCAL": {"semseg": 21}}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny graphs of many small convs: one thread is several times faster than two busy ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tasks(names: list[str]):
    return resolve_tasks(names, CLASSES["NYUD" if names == NYUD else "PASCAL"])


def _tiny(names: list[str], gating: str = "pascal", seed: int = 0, **kw) -> MLoRE:
    torch.manual_seed(seed)
    return mlore_tiny(tasks=_tasks(names), gating=gating, img_size=(H, W), **kw)


def _images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _randomise_batchnorm(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial running statistics and affine parameters, so that folding BN is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(("names", "gating"), [(NYUD, "nyud"), (PASCAL, "pascal")])
def test_forward_backward(names: list[str], gating: str) -> None:
    model = _tiny(names, gating).train()
    out = model(_images())
    tasks = _tasks(names)
    assert list(out) == names
    for t in tasks:
        assert out[t.name].shape == (2, t.channels, H, W)
    extra = model.extra_losses()
    assert set(extra) == {"load_balance"} and torch.isfinite(extra["load_balance"])
    loss = sum(o.square().mean() for o in out.values()) + extra["load_balance"]
    loss.backward()
    blk = model.moe1[0]
    for p in (blk.experts[0].down.weight, blk.routers["semseg"].out.weight, blk.generic.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_generic_path_sends_no_gradient_to_its_input() -> None:
    blk = _tiny(NYUD).moe1[0].eval()
    x = torch.randn(2, 32, 2, 3, requires_grad=True)
    # With zero gates and g_mix, only G sees x; it must train G without a gradient into x.
    names = blk.task_names
    y = blk._mix_training(
        {t: x for t in names}, {t: torch.zeros(2, 4) for t in names}, {t: torch.zeros(2) for t in names}
    )
    sum(v.square().sum() for v in y.values()).backward()
    assert x.grad is not None and x.grad.abs().max() == 0
    assert blk.generic.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gating", ["nyud", "pascal"])
def test_gates_are_per_image_and_top_k(gating: str) -> None:
    model = _tiny(PASCAL, gating).train()
    x = torch.cat([_images(1, seed=1), _images(1, seed=2) * 3.0])
    model(x)
    gates = model.gates()
    assert len(gates) == 8  # 4 taps x 2 stacked blocks
    k = model.moe1[0].top_k
    for block in gates.values():
        assert list(block) == PASCAL
        for g in block.values():
            assert g.shape == (2, 4)
            assert ((g > 0).sum(dim=1) == k).all()  # exactly k experts kept per image
            if gating == "nyud":
                assert torch.allclose(g.sum(dim=1), torch.ones(2))  # masked before the softmax
            else:
                assert (g.sum(dim=1) < 1).all()  # zeroed after the softmax
    # Two different images get different gates (the router is per image).
    assert not torch.allclose(gates["moe2.3"]["semseg"][0], gates["moe2.3"]["semseg"][1])


def test_noisy_top_k_gates_on_known_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    std = torch.zeros_like(logits)
    nyud = noisy_top_k_gates(logits, std, 2, "nyud", training=False)
    e = torch.exp(torch.tensor([2.0, 1.0]))
    assert torch.allclose(nyud, torch.tensor([[*(e / e.sum()).tolist(), 0.0, 0.0]]))
    pascal = noisy_top_k_gates(logits, std, 2, "pascal", training=False)
    full = logits.softmax(dim=1)
    assert torch.allclose(pascal, torch.tensor([[full[0, 0], full[0, 1], 0.0, 0.0]]))
    # The noise is drawn only in training mode, scaled by the router's std-devs.
    torch.manual_seed(0)
    noisy = noisy_top_k_gates(logits, torch.full_like(logits, 10.0), 2, "nyud", training=True)
    assert not torch.allclose(noisy, nyud)


def test_load_balance_loss_on_known_gates() -> None:
    # Block 1: tasks a and b, one image each -> per-expert mean [0.25, 0.25, 0.5, 0].
    block1 = {"a": torch.tensor([[0.5, 0.5, 0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0, 1.0, 0.0]])}
    # Block 2: uniform gates -> CV^2 = 0.
    block2 = {"a": torch.full((1, 4), 0.25), "b": torch.full((1, 4), 0.25)}
    mean, var = 0.25, (0.0 + 0.0 + 0.25**2 + 0.25**2) / 3  # unbiased variance over the 4 experts
    expected = var / mean**2
    assert cv_squared(torch.cat(list(block1.values()))).item() == pytest.approx(expected)
    assert load_balance_loss([block1, block2]).item() == pytest.approx(expected)

    model = _tiny(NYUD, "nyud", load_balance_weight=0.5).train()
    model(_images())
    gates = [blk.last_gates for blk in model.moe_blocks()]
    want = 0.5 * load_balance_loss(gates)
    assert model.extra_losses()["load_balance"].item() == pytest.approx(want.item())
    model.eval()
    with torch.no_grad():
        model(_images(seed=5))
    # Still the last training-mode forward's loss.
    assert model.extra_losses()["load_balance"].item() == pytest.approx(want.item())


# --------------------------------------------------------------------------- deploy forms


@pytest.mark.parametrize(
    ("names", "gating", "kernel_size"), [(NYUD, "nyud", 3), (PASCAL, "pascal", 3), (NYUD, "pascal", 1)]
)
def test_merged_forms_equal_training_form(names: list[str], gating: str, kernel_size: int) -> None:
    model = _tiny(names, gating, kernel_size=kernel_size)
    _randomise_batchnorm(model)
    model.eval()
    x = _images(3)
    with torch.no_grad():
        ref = model(x)
        ref_gates = model.gates()
        for form in ("dynamic-merge", "factorized"):
            model.set_form(form)
            out = model(x)
            diff = max((out[t] - ref[t]).abs().max().item() for t in names)
            assert diff <= 1e-5, f"{form}: max abs diff {diff}"
            assert all(blk.form == form for blk in model.moe_blocks())
            assert torch.equal(model.gates()["moe1.2"]["depth" if names == NYUD else "saliency"],
                               ref_gates["moe1.2"]["depth" if names == NYUD else "saliency"])  # fmt: skip
        model.set_form("training")
        assert torch.allclose(model(x)["edge"], ref["edge"])


def test_merged_forms_refuse_training_mode() -> None:
    model = _tiny(NYUD).train()
    for form in ("dynamic-merge", "factorized"):
        with pytest.raises(ConfigError, match="eval"):
            model.set_form(form)
    with pytest.raises(ConfigError, match="unknown form"):
        model.eval().set_form("merged")
    model.set_form("factorized")
    model.train()
    with pytest.raises(ConfigError, match="eval"):
        model(_images())


def test_wrong_input_size_names_the_expected_size() -> None:
    model = _tiny(NYUD).eval()
    with pytest.raises(ConfigError, match=r"height=48, width=48.*padding your images to shape \(32, 48\)"):
        model(torch.zeros(1, 3, 48, 48))


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize(
    ("names", "form"),
    [
        (NYUD, "training"),
        (PASCAL, "factorized"),
        # Each export of the full tiny graph takes 30-60 s on 2 busy cores; the other pairs are slow tests.
        pytest.param(PASCAL, "training", marks=pytest.mark.slow),
        pytest.param(NYUD, "factorized", marks=pytest.mark.slow),
    ],
)
def test_onnx_export_matches_pytorch(tmp_path: Path, names: list[str], form: str) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.runtime import OnnxRuntimeModel

    model = _tiny(names, "nyud" if names == NYUD else "pascal")
    _randomise_batchnorm(model)
    model.eval().set_form(form)
    path = export_onnx(model, tmp_path / "mlore.onnx", input_size=(H, W), batch=2, metadata={"deploy_form": form})
    x = _images(2, seed=7)
    with torch.no_grad():
        ref = model(x)
    got = OnnxRuntimeModel(path).run(x.numpy())
    for t in names:
        diff = float(abs(got[t] - ref[t].numpy()).max())
        assert diff <= 1e-4, f"{t}: ONNX Runtime differs by {diff}"


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_loads_local_checkpoint(tmp_path: Path, suffix: str) -> None:
    source = _tiny(NYUD, seed=11)
    state = source.backbone.vit.state_dict()
    path = tmp_path / f"vit_tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    model = _tiny(NYUD, seed=12, pretrained_path=str(path))
    for k, v in model.backbone.vit.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Different seed, so the decoder is not what made the weights equal.
    assert not torch.equal(model.moe1[0].generic.weight, source.moe1[0].generic.weight)


def test_backbone_refuses_checkpoint_with_wrong_shapes(tmp_path: Path) -> None:
    state = _tiny(NYUD).backbone.vit.state_dict()
    state["patch_embed.proj.weight"] = torch.zeros(7, 3, 16, 16)
    path = tmp_path / "bad_vit.pth"
    torch.save(state, path)
    with pytest.raises(DataError, match="bad_vit.pth"):
        _tiny(NYUD, pretrained_path=str(path))


def test_registry_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mlore-tiny", tasks=_tasks(NYUD), img_size=[H, W], gating="nyud").eval()
    save_model(tmp_path, model)
    again = load_model(tmp_path).eval()
    x = _images(1)
    with torch.no_grad():
        assert torch.equal(model(x)["depth"], again(x)["depth"])


# --------------------------------------------------------------------------- paper sizes


def test_paper_sizes_on_meta_device() -> None:
    # Official figures (measured on the official code): 407.7M PASCAL ViT-L, 551.6M NYUD ViT-L.
    with torch.device("meta"):
        pascal = mlore_vitl_pascal(tasks=resolve_tasks(PASCAL, {"semseg": 21}))
        nyud = mlore_vitl_nyud(tasks=resolve_tasks(NYUD, {"semseg": 40}))
    assert count_params(pascal) / 1e6 == pytest.approx(407.7, rel=1e-3)
    assert count_params(nyud) / 1e6 == pytest.approx(551.6, rel=1e-3)
    assert nyud.moe1[0].top_k == 9 and len(nyud.moe1[0].ranks) == 15 and nyud.moe1[0].gating == "nyud"
    assert pascal.moe1[0].gating == "pascal" and pascal.img_size == (512, 512)


def test_conv_backbone_variant_forms_and_export(tmp_path) -> None:
    """mlore-conv-s: the faithful decoder on the small conv encoder; merged forms stay exact."""
    from edgemt.models import create_model
    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.runtime import OnnxRuntimeModel

    torch.manual_seed(0)
    tasks = resolve_tasks(["semseg", "depth", "normals", "edge"], {"semseg": 5})
    m = create_model("mlore-conv-s", tasks=tasks, img_size=(32, 48), channels=16, ranks=(2, 4, 6), top_k=2)
    out = m(torch.randn(2, 3, 32, 48))
    sum(v.mean() for v in out.values()).backward()
    assert m.grid == (4, 6) and out["semseg"].shape == (2, 5, 32, 48)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = m(x)
        for form in ("dynamic-merge", "factorized"):
            m.set_form(form)
            got = m(x)
            assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5, form
    path = export_onnx(m, tmp_path / "m.onnx", input_size=(32, 48))
    ort = OnnxRuntimeModel(path).run(x[:1].numpy())
    with torch.no_grad():
        pt = m(x[:1])
    assert max(abs(ort[k] - pt[k].numpy()).max() for k in pt) <= 1e-4
