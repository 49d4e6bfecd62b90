"""SCA-MTL (edgemt.models.scamtl): shapes, deep supervision, cross-task and
cross-scale flow, Swin fidelity, ONNX parity, paper-size build on meta, and
local HRNet weights.

Everything trainable runs the ``scamtl-tiny`` variant at 64x96, batch 2; the
paper-size variants are only built on the meta device (no weights allocated),
except the weight-loading test, which needs real HRNet tensors.
"""

from __future__ import annotations

import pytest
import torch

from edgemt.errors import ConfigError, DataError
from edgemt.models import scamtl
from edgemt.models.profile import count_macs, count_params
from edgemt.models.registry import create_model
from edgemt.models.scamtl import CSAM, CTAM, SCAMTL, scamtl_hrnet18_nyud, scamtl_hrnet18_pascal, scamtl_tiny
from edgemt.tasks import resolve_tasks

H, W = 64, 96
NYUD = (["semseg", "depth", "normals", "edge"], {"semseg": 40})
PASCAL = (["semseg", "human_parts", "saliency", "normals", "edge"], {"semseg": 21})


def _tasks(spec):
    names, classes = spec
    return resolve_tasks(names, classes)


def _labels(tasks, b: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Valid random labels in the layout the datasets return (see edgemt.tasks)."""
    out = {}
    for t in tasks:
        if t.label_kind == "class":
            out[t.name] = torch.randint(0, t.channels, (b, h, w), generator=gen)
        elif t.name == "depth":
            out[t.name] = torch.rand(b, 1, h, w, generator=gen) + 0.5
        elif t.name == "normals":
            out[t.name] = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=gen), dim=1)
        else:  # edge
            out[t.name] = (torch.rand(b, 1, h, w, generator=gen) > 0.9).float()
    return out


@pytest.mark.parametrize("spec", [NYUD, PASCAL], ids=["nyud", "pascal"])
def test_forward_backward_and_deep_supervision(spec):
    torch.manual_seed(0)
    tasks = _tasks(spec)
    model = scamtl_tiny(tasks=tasks).train()
    x = torch.randn(2, 3, H, W)
    out = model(x)
    assert list(out) == [t.name for t in tasks]
    for t in tasks:
        assert out[t.name].shape == (2, t.channels, H, W)
        assert torch.isfinite(out[t.name]).all()

    # One initial prediction per task and scale, at the scale's resolution (s=0 is 1/4).
    aux = model.aux_outputs()
    assert len(aux) == 4 * len(tasks)
    for t in tasks:
        for s, r in enumerate((4, 8, 16, 32)):
            assert aux[f"{t.name}@scale{s}"].shape == (2, t.channels, H // r, W // r)
    assert model.extra_losses() == {}

    gen = torch.Generator().manual_seed(1)
    labels = _labels(tasks, 2, H, W, gen)
    from edgemt.tasks import task_loss

    loss = sum(t.loss_weight * task_loss(t, out[t.name], labels[t.name]) for t in tasks)
    ds = model.deep_supervision_loss(labels)
    assert ds.ndim == 0 and torch.isfinite(ds) and ds > 0
    (loss + ds).backward()
    # Every parameter takes part: the initial-prediction decoders through the deep supervision.
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead, dead[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    # Eval mode computes no initial predictions (nothing dead in exported graphs).
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.aux_outputs() == {}
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.deep_supervision_loss(labels)


def test_registry_names():
    tasks = _tasks(NYUD)
    model = create_model("scamtl-tiny", tasks=tasks, window=2)
    assert isinstance(model, SCAMTL) and model.arch()["kwargs"] == {"window": 2}
    assert scamtl_hrnet18_nyud.__name__.replace("_", "-") == "scamtl-hrnet18-nyud"
    with pytest.raises(ConfigError, match="divisible by 32"):
        scamtl_tiny(tasks=tasks, img_size=(60, 96))
    with pytest.raises(ConfigError, match="tiny"):
        scamtl_tiny(tasks=tasks, pretrained_path="x.safetensors")


def test_ctam_carries_information_between_tasks():
    torch.manual_seed(0)
    names = ["a", "b", "c"]
    ctam = CTAM(names, dim=16, heads=2, kv_pool=2).eval()
    feats = {n: torch.randn(1, 16, 8, 12) for n in names}
    with torch.no_grad():
        base = ctam(feats)
        bumped = ctam({**feats, "b": feats["b"] + torch.randn(1, 16, 8, 12)})
    assert not torch.allclose(base["a"], bumped["a"], atol=1e-5)  # a attends to b
    assert not torch.allclose(base["c"], bumped["c"], atol=1e-5)
    assert CTAM(["a"], dim=16, heads=2)({"a": feats["a"]})["a"] is feats["a"]  # one task: identity


def test_ctam_batched_pairs_equal_separate_attentions():
    """The batched CTAM is T-1 independent attentions per task, each with its own projections."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    names, dim, heads, pool = ["a", "b", "c"], 8, 2, 2
    ctam = CTAM(names, dim=dim, heads=heads, kv_pool=pool).eval()
    feats = {n: torch.randn(2, dim, 6, 8) for n in names}
    with torch.no_grad():
        got = ctam(feats)
        for t in names:
            others = [u for u in names if u != t]
            parts = []
            for j, u in enumerate(others):
                slot = [x for x in names if x != u].index(t)
                wq = ctam.q[t].weight[j * dim : (j + 1) * dim]
                bq = ctam.q[t].bias[j * dim : (j + 1) * dim]
                sl = slice(slot * 2 * dim, (slot + 1) * 2 * dim)
                kv = F.conv2d(F.avg_pool2d(feats[u], pool), ctam.kv[u].weight[sl], ctam.kv[u].bias[sl])
                q = F.conv2d(feats[t], wq, bq)

                def split(x):  # (B, C, H, W) -> (B, heads, HW, d)
                    return x.flatten(2).reshape(2, heads, dim // heads, -1).transpose(2, 3)

                att = F.scaled_dot_product_attention(split(q), split(kv[:, :dim]), split(kv[:, dim:]))
                att = att.transpose(2, 3).reshape(2, dim, 6, 8)
                wp = ctam.proj[t].weight[j * dim : (j + 1) * dim]
                parts.append(F.conv2d(att, wp, ctam.proj[t].bias[j * dim : (j + 1) * dim]))
            want = feats[t] + ctam.reduce[t](torch.cat(parts, dim=1))
            torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)


def test_ctam_in_the_model_at_the_finest_scale():
    """Perturbing depth's feature at 1/4 (after which only CTAM mixes tasks) changes semseg's output."""
    torch.manual_seed(0)
    model = scamtl_tiny(tasks=_tasks(NYUD)).eval()
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        base = model(x)

    def bump(module, args, output):
        feats, preds = output
        return {**feats, "depth": feats["depth"] + 1.0}, preds

    handle = model.initial[0].register_forward_hook(bump)
    try:
        with torch.no_grad():
            bumped = model(x)
    finally:
        handle.remove()
    assert not torch.allclose(base["semseg"], bumped["semseg"], atol=1e-5)
    assert not torch.allclose(base["depth"], bumped["depth"], atol=1e-5)


def test_csam_fine_scale_attends_to_coarser_scales():
    torch.manual_seed(0)
    chans, sizes = [8, 16, 24, 32], [(16, 24), (8, 12), (4, 6), (2, 3)]
    csam = CSAM(chans, heads=[1, 2, 3, 4], kv_pools=[4, 2, 1, 1], head_channels=16, out_channels=3).eval()
    feats = [torch.randn(1, c, *s) for c, s in zip(chans, sizes)]
    with torch.no_grad():
        base = csam.attend(feats)
        for coarse in (1, 2, 3):
            bumped = list(feats)
            bumped[coarse] = feats[coarse] + torch.randn_like(feats[coarse])
            g = csam.attend(bumped)
            assert not torch.allclose(base[0], g[0], atol=1e-5), f"scale 0 ignores scale {coarse}"
            # A scale never reads a finer one.
            for s in range(coarse + 1, 4):
                torch.testing.assert_close(base[s], g[s])
        assert base[3] is feats[3]
        assert csam(feats).shape == (1, 3, 16, 24)


def test_swin_block_matches_timm():
    """The compact Swin block equals timm's SwinTransformerBlock (shifted windows, rel. bias) given the same weights."""
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(0)
    dim, heads, ws, res = 16, 2, 4, (8, 12)
    for shift in (False, True):
        ours = scamtl._SwinBlock(dim, heads, ws, shift=shift).eval()
        ref = SwinTransformerBlock(dim, res, num_heads=heads, window_size=ws, shift_size=ws // 2 if shift else 0).eval()
        with torch.no_grad():
            ours.rel_bias.normal_()
            ref.attn.relative_position_bias_table.copy_(ours.rel_bias)
            for a, b in [
                (ours.norm1, ref.norm1),
                (ours.qkv, ref.attn.qkv),
                (ours.proj, ref.attn.proj),
                (ours.norm2, ref.norm2),
                (ours.mlp[0], ref.mlp.fc1),
                (ours.mlp[2], ref.mlp.fc2),
            ]:
                b.load_state_dict(a.state_dict())
            x = torch.randn(2, *res, dim)
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [NYUD, PASCAL], ids=["nyud", "pascal"])
def test_onnx_export_matches_onnxruntime(spec, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from edgemt.targets.onnx import export_onnx

    torch.manual_seed(0)
    tasks = _tasks(spec)
    model = scamtl_tiny(tasks=tasks)
    # A few training steps' worth of BN statistics so eval-mode BN is not the identity.
    with torch.no_grad():
        model.train()(torch.randn(2, 3, H, W))
    model.eval()
    path = export_onnx(model, tmp_path / "scamtl.onnx", input_size=(H, W))
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        ref = model(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"image": x.numpy()})
    assert [o.name for o in sess.get_outputs()] == [t.name for t in tasks]
    for t, o in zip(tasks, outs):
        assert o.shape == (1, t.channels, H, W)
        assert float(abs(torch.from_numpy(o) - ref[t.name]).max()) <= 1e-4, t.name


@pytest.mark.parametrize(
    ("fn", "spec", "size"),
    [(scamtl_hrnet18_nyud, NYUD, (480, 640)), (scamtl_hrnet18_pascal, PASCAL, (512, 512))],
    ids=["nyud", "pascal"],
)
def test_paper_size_builds_on_meta(fn, spec, size):
    with torch.device("meta"):
        model = fn(tasks=_tasks(spec))
    assert model.img_size == size
    assert model.channels == [36, 72, 144, 288]  # HRNet-W18-small-v2 ++ Swin
    assert count_params(model.backbone) == pytest.approx(3.86e6, rel=0.01)  # HRNet branches, no classifier head
    params = count_params(model)
    macs = count_macs(model, size, device="meta")
    print(f"{fn.__name__}: {params / 1e6:.2f}M params, {macs / 1e9:.1f} GMACs at {size[0]}x{size[1]}")
    assert 20e6 < params < 100e6
    assert 30e9 < macs < 200e9


def test_local_hrnet_weights(tmp_path):
    """A features-model or timm-classifier checkpoint loads; a mismatching one raises DataError."""
    import timm
    from safetensors.torch import save_file

    tasks = resolve_tasks(["depth"])
    small = {"window": 7, "head_channels": 8}  # keep the decoder cheap; the backbone is what is tested
    torch.manual_seed(0)
    feat = timm.create_model(
        "hrnet_w18_small_v2", pretrained=False, features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
    )
    ckpt = tmp_path / "hrnet_feat.safetensors"
    save_file({k: v.contiguous() for k, v in feat.state_dict().items()}, str(ckpt))
    model = scamtl_hrnet18_nyud(tasks=tasks, pretrained_path=str(ckpt), **small)
    for k, v in feat.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)

    full = timm.create_model("hrnet_w18_small_v2", pretrained=False)
    ckpt_full = tmp_path / "hrnet_cls.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(ckpt_full))
    model = scamtl_hrnet18_nyud(tasks=tasks, pretrained_path=str(ckpt_full), **small)
    full_state = full.state_dict()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, full_state[k])

    bad = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3, 3, 3)}, str(bad))
    with pytest.raises(DataError, match="bad.safetensors"):
        scamtl_hrnet18_nyud(tasks=tasks, pretrained_path=str(bad), **small)
    with pytest.raises(DataError, match="does not exist"):
        scamtl_hrnet18_nyud(tasks=tasks, pretrained_path=str(tmp_path / "missing.safetensors"), **small)
