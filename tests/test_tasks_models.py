"""Task registry losses on hand-computed values; the model registry and save/load without pickle."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgemt import create_model, list_models, load_model, resolve_tasks, save_model
from edgemt.errors import ConfigError, DataError
from edgemt.models.profile import count_macs, count_params
from edgemt.tasks import TASKS, activate, get_task, task_loss


def test_registry_has_the_six_tasks_with_directions() -> None:
    assert set(TASKS) == {"semseg", "depth", "normals", "edge", "saliency", "human_parts"}
    assert TASKS["depth"].higher_is_better is False and TASKS["semseg"].higher_is_better is True
    assert TASKS["human_parts"].channels == 7 and TASKS["saliency"].channels == 2
    with pytest.raises(ConfigError, match="unknown task 'colour'"):
        get_task("colour")
    with pytest.raises(ConfigError, match="duplicate"):
        resolve_tasks(["depth", "depth"])


def test_ce_ignores_255() -> None:
    t = get_task("semseg").with_channels(2)
    raw = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    label = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert task_loss(t, raw, label).item() == pytest.approx(expected, rel=1e-5)


def test_depth_l1_ignores_zero_depth() -> None:
    t = get_task("depth")
    raw = torch.tensor([[[[1.0, 5.0, 2.0]]]])
    label = torch.tensor([[[[2.0, 0.0, 2.5]]]])
    assert task_loss(t, raw, label).item() == pytest.approx((1.0 + 0.5) / 2)


def test_normals_l1_normalises_prediction_and_ignores_zero_labels() -> None:
    t = get_task("normals")
    raw = torch.tensor([0.0, 0.0, 4.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    label = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]).view(1, 3, 1, 2)  # 2nd pixel invalid
    assert task_loss(t, raw, label).item() == pytest.approx(0.0, abs=1e-7)
    label2 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    assert task_loss(t, raw, label2).item() == pytest.approx((1 + 0 + 1) / 3)


def test_balanced_bce_weights_positives_by_pos_weight() -> None:
    t = get_task("edge")
    raw = torch.zeros(1, 1, 1, 3)
    label = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    # BCE(0 logit) = log 2 for both valid pixels; weights 0.95 and 0.05, mean over 2 valid pixels.
    assert task_loss(t, raw, label).item() == pytest.approx(math.log(2) * (0.95 + 0.05) / 2, rel=1e-5)


def test_balanced_ce_upweights_the_rare_class() -> None:
    t = get_task("saliency")
    raw = torch.zeros(1, 2, 1, 4)
    label = torch.tensor([[[1, 0, 0, 0]]])
    # Equal logits: every pixel's CE is log 2 whatever the weights (weighted mean of equal values).
    assert task_loss(t, raw, label).item() == pytest.approx(math.log(2), rel=1e-5)
    raw2 = torch.tensor([[[[0.0, 0, 0, 0]], [[3.0, 0, 0, 0]]]])  # confident and right on the positive
    l_bal = task_loss(t, raw2, label).item()
    plain = torch.nn.functional.cross_entropy(raw2, label).item()
    assert l_bal < plain  # the positive pixel (right) weighs 0.75, the negatives 0.25


def test_activations() -> None:
    raw = torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1)
    assert torch.allclose(activate(get_task("normals"), raw).flatten(), torch.tensor([0.6, 0.0, 0.8]))
    assert activate(get_task("depth"), torch.tensor([-1.0])).item() == 0.0


TASKS4 = resolve_tasks(["semseg", "depth", "normals", "edge"], {"semseg": 13})


@pytest.mark.parametrize("name", list_models("baseline-*"))
def test_every_registered_model_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    m = create_model(name, tasks=TASKS4)
    out = m(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semseg": (2, 13, 64, 96),
        "depth": (2, 1, 64, 96),
        "normals": (2, 3, 64, 96),
        "edge": (2, 1, 64, 96),
    }
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_sizes_grow_across_baseline_variants() -> None:
    sizes = [count_macs(create_model(n, tasks=TASKS4), (96, 128)) for n in ("baseline-xs", "baseline-s", "baseline-m")]
    assert sizes == sorted(sizes) and sizes[0] * 3 < sizes[-1]


def test_unknown_model_and_kwarg() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet-9000'"):
        create_model("resnet-9000", tasks=TASKS4)
    with pytest.raises(ConfigError, match="baseline-s"):
        create_model("baseline-s", tasks=TASKS4, wingspan=3)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = create_model("baseline-xs", tasks=TASKS4, neck=24).eval()
    save_model(tmp_path, m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.json", "weights.safetensors"]
    m2 = load_model(tmp_path).eval()
    assert count_params(m2) == count_params(m)
    x = torch.randn(1, 3, 32, 32)
    for k, v in m(x).items():
        assert torch.equal(v, m2(x)[k])


def test_load_rejects_mismatched_weights(tmp_path: Path) -> None:
    save_model(tmp_path, create_model("baseline-xs", tasks=TASKS4))
    other = tmp_path / "other"
    save_model(other, create_model("baseline-s", tasks=TASKS4))
    (other / "weights.safetensors").replace(tmp_path / "weights.safetensors")
    with pytest.raises(DataError, match="weights do not match arch.json"):
        load_model(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_model(tmp_path)
