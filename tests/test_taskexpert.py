"""TaskExpert (edgemt.models.taskexpert): shapes, gates, the memory, the heads' input, ONNX, paper size.

Everything runs the tiny variant (ViT embed 48, depth 4) at 64x96 on CPU,
except the size check, which builds ViT-L on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from edgemt.errors import ConfigError
from edgemt.models.profile import count_params
from edgemt.models.taskexpert import TaskExpert, taskexpert_tiny, taskexpert_vitl_nyud
from edgemt.tasks import resolve_tasks

H, W = 64, 96
NYUD = ("semseg", "depth", "normals", "edge")
PASCAL = ("semseg", "human_parts", "saliency", "normals", "edge")


def _tasks(names: tuple[str, ...]):
    return resolve_tasks(names, {"semseg": 40 if "depth" in names else 21})


def _model(names: tuple[str, ...] = NYUD, **kw) -> TaskExpert:
    torch.manual_seed(0)
    return taskexpert_tiny(tasks=_tasks(names), **kw)


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("names", [NYUD, PASCAL], ids=["nyud", "pascal"])
def test_forward_backward(names):
    model = _model(names)
    out = model(_images())
    assert list(out) == list(names)
    for t in _tasks(names):
        assert out[t.name].shape == (2, t.channels, H, W)
        assert torch.isfinite(out[t.name]).all()
    sum(o.float().pow(2).mean() for o in out.values()).backward()
    # Gradients reach the backbone, every MMoE layer's experts and gates, and every head.
    assert model.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    for layer in model.layers:
        assert layer.experts.fc1.weight.grad.abs().sum() > 0
        assert layer.gate.weight.grad.abs().sum() > 0
    for head in model.heads.values():
        assert head.pred.weight.grad.abs().sum() > 0


def test_gates_shape_sum_and_input_dependence():
    model = _model().eval()
    with torch.no_grad():
        model(_images(seed=1))
        first = [{k: v.clone() for k, v in g.items()} for g in model.last_gates]
        model(_images(seed=2))
    assert len(model.last_gates) == len(model.layers) == 4
    for i, layer_gates in enumerate(model.last_gates):
        # memory_init="first": layer 0 has no memory expert, later layers have E + 1 entries.
        n_gates = model.num_experts + (i > 0)
        for name in NYUD:
            g = layer_gates[name]
            assert g.shape == (2, n_gates, H // 16, W // 16)
            torch.testing.assert_close(g.sum(dim=1), torch.ones(2, H // 16, W // 16))
            assert (g >= 0).all()
            assert not torch.allclose(g, first[i][name])  # another image, other gates
            assert g.std(dim=(2, 3)).max() > 1e-4  # per-pixel gates vary over the image
    # Tasks have their own gating networks.
    assert not torch.allclose(model.last_gates[1]["semseg"], model.last_gates[1]["depth"])


def test_image_gates_and_zero_memory_init():
    model = _model(gate_granularity="image", memory_init="zeros").eval()
    with torch.no_grad():
        model(_images())
    for layer_gates in model.last_gates:
        g = layer_gates["edge"]
        assert g.shape == (2, model.num_experts + 1, 1, 1)
        torch.testing.assert_close(g.sum(dim=1), torch.ones(2, 1, 1))
        assert not torch.allclose(g[0], g[1])


def _capture_experts(model: TaskExpert) -> list[torch.Tensor]:
    """Record each layer's expert bank output (B, N, E, C) during the next forward."""
    captured: list[torch.Tensor] = []
    for layer in model.layers:
        layer.experts.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    return captured


def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, N, C)."""
    return t.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("rule", ["add", "replace", "gated"])
def test_memory_update_rule(rule):
    model = _model(memory_update=rule).eval()
    experts = _capture_experts(model)
    with torch.no_grad():
        model(_images())
    e = model.num_experts
    prev = None
    for i in range(len(model.layers)):
        for t, name in enumerate(NYUD):
            g = _as_tokens(model.last_gates[i][name])  # (B, N, G)
            # The task feature: gate-weighted experts plus, after layer 0, the gated memory.
            feat = (g[..., :e, None] * experts[i]).sum(dim=2)
            if prev is not None:
                feat = feat + g[..., e:] * _as_tokens(prev[name])
            torch.testing.assert_close(_as_tokens(model.last_task_features[i][name]), feat)
            mem = _as_tokens(model.last_memory[i][name])
            if prev is None or rule == "replace":
                expected = feat
            elif rule == "add":
                expected = _as_tokens(prev[name]) + feat
            else:
                old = _as_tokens(prev[name])
                w, b = model.layers[i].mem_w[t], model.layers[i].mem_b[t]
                z = torch.sigmoid(torch.cat([old, feat], dim=-1) @ w + b)
                expected = z * feat + (1 - z) * old
            torch.testing.assert_close(mem, expected)
        prev = model.last_memory[i]


def test_heads_read_only_the_final_memory():
    model = _model().eval()
    seen: dict[str, torch.Tensor] = {}
    for name, head in model.heads.items():
        head.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach()))
    x = _images()
    with torch.no_grad():
        ref = model(x)
    for name in NYUD:
        assert torch.equal(seen[name], model.last_memory[-1][name])

    # Perturbing an intermediate layer's task-feature output (not its memory write)
    # leaves the predictions unchanged; perturbing the final memory changes them.
    def bump_feats(m, args, out):
        return out[0] + 1.0, out[1], out[2]

    handle = model.layers[1].register_forward_hook(bump_feats)
    with torch.no_grad():
        same = model(x)
    handle.remove()
    for name in NYUD:
        torch.testing.assert_close(same[name], ref[name])

    def bump_memory(m, args, out):
        return out[0], out[1], out[2] + 1.0

    model.layers[-1].register_forward_hook(bump_memory)
    with torch.no_grad():
        other = model(x)
    assert all(not torch.allclose(other[n], ref[n]) for n in NYUD)


def test_balance_loss_is_opt_in():
    model = _model()
    model(_images())
    assert model.extra_losses() == {}
    model = _model(balance_weight=1e-2)
    model(_images())
    loss = model.extra_losses()["balance"]
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert model.layers[0].gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw", [{"memory_update": "sum"}, {"gate_granularity": "token"}, {"memory_init": "rand"}, {"expert_type": "conv"}]
)
def test_bad_config(kw):
    with pytest.raises(ConfigError):
        _model(**kw)


@pytest.mark.parametrize("names", [NYUD, PASCAL], ids=["nyud", "pascal"])
def test_onnx_export_parity(names, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from edgemt.targets.onnx import export_onnx

    model = _model(names).eval()
    path = export_onnx(model, tmp_path / "taskexpert.onnx", input_size=(H, W))
    x = _images(batch=1, seed=3)
    with torch.no_grad():
        ref = model(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"image": x.numpy()})
    for name, got in zip(names, outs):
        diff = (torch.from_numpy(got) - ref[name]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs diff {diff}"


def test_paper_size_on_meta():
    with torch.device("meta"):
        model = taskexpert_vitl_nyud(tasks=_tasks(NYUD))
    n = count_params(model)
    print(f"taskexpert-vitl-nyud: {n / 1e6:.1f}M params")
    assert 300e6 < n < 450e6
    assert len(model.layers) == 4 and model.backbone.taps == (5, 11, 17, 23)


@pytest.mark.parametrize(("stride", "fine_skip"), [(4, False), (8, True)])
def test_conv_tap_variant_trains_and_exports(tmp_path, stride: int, fine_skip: bool) -> None:
    """taskexpert-conv-s: the memorial MoE decoder on conv taps; heads upsample from the tap grid to 1/4."""
    from edgemt.models import create_model
    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.runtime import OnnxRuntimeModel

    torch.manual_seed(0)
    over = {"widths": (8, 16, 24, 32), "depth": 0, "stride": stride}
    m = create_model(
        "taskexpert-conv-s",
        tasks=_tasks(NYUD),
        img_size=(32, 48),
        backbone_overrides=over,
        width=16,
        fine_skip=fine_skip,
    )
    out = m(_images(2)[..., :32, :48])
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == dict.fromkeys(NYUD, (32, 48))
    assert m.last_memory[-1]["semseg"].shape[-2:] == (32 // stride, 48 // stride)
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in m.tap_proj.parameters())
    if fine_skip:
        assert all(p.grad is not None for p in m.fine_skip.parameters())
    m.eval()
    x = _images(1)[..., :32, :48]
    path = export_onnx(m, tmp_path / "te.onnx", input_size=(32, 48))
    got = OnnxRuntimeModel(path).run(x.numpy())
    with torch.no_grad():
        ref = m(x)
    assert max(abs(got[k] - ref[k].numpy()).max() for k in ref) <= 1e-4


@pytest.mark.parametrize(("name", "conv_first"), [("taskexpert-conv-m", False), ("taskexpert-conv-fast", True)])
def test_head_conv_first_convolves_on_the_token_grid(tmp_path, name: str, conv_first: bool) -> None:
    """head_conv_first: each head's stage conv runs on the 1/8 memory grid, then upsamples to 1/4."""
    from edgemt.models import create_model
    from edgemt.targets.onnx import export_onnx
    from edgemt.targets.runtime import OnnxRuntimeModel

    torch.manual_seed(0)
    m = create_model(name, tasks=_tasks(NYUD), img_size=(32, 48))
    convs = [mod for mod in m.heads["depth"].body.modules() if isinstance(mod, torch.nn.Conv2d)]
    seen: list[tuple[int, int]] = []
    hooks = [c.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:]))) for c in convs]
    x = _images(2)[..., :32, :48]
    out = m(x)
    for h in hooks:
        h.remove()
    # 32x48 at stride 8: a 4x6 memory grid; the heads end at 1/4 (8x12).
    assert seen == ([(4, 6), (8, 12)] if conv_first else [(8, 12), (8, 12)])
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == dict.fromkeys(NYUD, (32, 48))
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in m.heads.parameters())
    m.eval()
    path = export_onnx(m, tmp_path / "te.onnx", input_size=(32, 48))
    got = OnnxRuntimeModel(path).run(x[:1].numpy())
    with torch.no_grad():
        ref = m(x[:1])
    assert max(abs(got[k] - ref[k].numpy()).max() for k in ref) <= 1e-4


def test_head_conv_first_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="head_conv_first"):
        _model(head_conv_first="yes")


def test_fine_skip_into_the_last_conv() -> None:
    """fine_skip_into='conv': the stride-4 detail is added to the last 3x3 conv's input, not the prediction's."""
    from edgemt.models import create_model

    torch.manual_seed(0)
    m = create_model("taskexpert-conv-fast", tasks=_tasks(NYUD), img_size=(32, 48)).eval()
    head = m.heads["edge"]
    # conv-fast's default (the 4-seed same-budget winner); conv-m keeps the skip at the prediction.
    assert {h.skip_into for h in m.heads.values()} == {"conv"}
    conv_m = create_model("taskexpert-conv-m", tasks=_tasks(NYUD), img_size=(32, 48))
    assert {h.skip_into for h in conv_m.heads.values()} == {"pred"}
    pred = create_model("taskexpert-conv-fast", tasks=_tasks(NYUD), img_size=(32, 48), fine_skip_into="pred")
    assert {h.skip_into for h in pred.heads.values()} == {"pred"}
    x = _images(2)[..., :32, :48]
    seen = {}
    hook = head.body[-1].register_forward_hook(lambda mod, inp, out: seen.setdefault("in", inp[0]))
    with torch.no_grad():
        m(x)
        hook.remove()
        maps = m.last_memory[-1]["edge"]
        _, fine = m.backbone.forward_with_fine(x)
        expected = head.body[:-1](maps) + m.fine_skip["edge"](fine)
    assert torch.allclose(seen["in"], expected, atol=1e-6)
    assert m.fine_skip["edge"].out_channels == head.body[-1][0].in_channels
    m.train()
    sum(v.mean() for v in m(x).values()).backward()
    assert all(p.grad is not None for p in m.fine_skip.parameters())
    with pytest.raises(ConfigError, match="fine_skip_into"):
        create_model("taskexpert-conv-fast", tasks=_tasks(NYUD), img_size=(32, 48), fine_skip_into="head")
