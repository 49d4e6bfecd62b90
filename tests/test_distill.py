"""Distillation: the KD terms on hand-computed values, compatibility errors, and a short run."""

from __future__ import annotations

import math

import pytest
import torch

from edgemt.compress.distill import (
    Distiller,
    check_compatible,
    cwd_loss,
    distillation_loss,
    kd_bce,
    kd_l1,
    kd_normals,
    kd_saliency,
    kd_semseg,
    valid_mask,
)
from edgemt.config import DistillConfig, TrainConfig
from edgemt.errors import ConfigError
from edgemt.models import create_model
from edgemt.tasks import get_task, resolve_tasks

NYUD = resolve_tasks(["semseg", "depth", "normals", "edge"], {"semseg": 5})


def test_semseg_kd_hand_computed_with_temperature_and_ignore_mask():
    # Two pixels, two classes. Pixel 0: teacher logits (2, 0), student (0, 0). Pixel 1 is ignored.
    s = torch.tensor([[[[0.0, 5.0]], [[0.0, -5.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, -9.0]], [[0.0, 9.0]]]])
    mask = torch.tensor([[[[True, False]]]])
    T = 2.0
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # teacher at T=2
    kl = float((p * (p.log() - math.log(0.5))).sum())  # student uniform at any T
    assert float(kd_semseg(s, t, mask, T)) == pytest.approx(kl * T * T, rel=1e-5)
    # Without the mask pixel 1 counts too and the value changes.
    assert float(kd_semseg(s, t, None, T)) != pytest.approx(kl * T * T, rel=1e-3)
    # The T^2 scaling: at T=1 the value is the plain KL.
    p1 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    kl1 = float((p1 * (p1.log() - math.log(0.5))).sum())
    assert float(kd_semseg(s, t, mask, 1.0)) == pytest.approx(kl1, rel=1e-5)


def test_teacher_outputs_are_resized_to_the_student():
    # A constant teacher map at 2x the resolution resizes to the same constant.
    s = torch.zeros(1, 1, 4, 6)
    t = torch.full((1, 1, 8, 12), 3.0)
    assert float(kd_l1(s, t, None)) == pytest.approx(3.0)
    # Resizing is bilinear: a left/right step at 8x12 becomes a blend at 4x6.
    t2 = torch.zeros(1, 1, 8, 12)
    t2[..., 6:] = 4.0
    expect = torch.nn.functional.interpolate(t2, size=(4, 6), mode="bilinear", align_corners=False).abs().mean()
    assert float(kd_l1(s, t2, None)) == pytest.approx(float(expect))


def test_depth_l1_under_mask():
    s = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    t = torch.tensor([[[[2.0, 2.0, 0.0]]]])
    mask = torch.tensor([[[[True, True, False]]]])
    assert float(kd_l1(s, t, mask)) == pytest.approx(0.5)


def test_normals_kd_compares_unit_vectors():
    s = torch.tensor([0.0, 0.0, 5.0]).reshape(1, 3, 1, 1)  # unit (0, 0, 1) after normalising
    t = torch.tensor([0.0, 2.0, 0.0]).reshape(1, 3, 1, 1)  # unit (0, 1, 0)
    assert float(kd_normals(s, t, None)) == pytest.approx(2.0 / 3.0)


def test_edge_bce_to_teacher_probabilities():
    s = torch.tensor([0.0]).reshape(1, 1, 1, 1)
    t = torch.tensor([math.log(3.0)]).reshape(1, 1, 1, 1)  # p = 0.75
    assert float(kd_bce(s, t, None)) == pytest.approx(math.log(2.0), rel=1e-5)
    # Weighted like the balanced GT loss: weight = 0.75 * 0.95 + 0.25 * 0.05.
    assert float(kd_bce(s, t, None, 0.95)) == pytest.approx(math.log(2.0) * (0.75 * 0.95 + 0.25 * 0.05), rel=1e-5)


def test_saliency_soft_cross_entropy():
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)  # teacher p(fg) = 0.75
    assert float(kd_saliency(s, t, None)) == pytest.approx(math.log(2.0), rel=1e-5)


def test_cwd_is_zero_for_equal_maps_and_positive_otherwise():
    a = torch.randn(2, 3, 4, 5)
    assert float(cwd_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cwd_loss(a, torch.randn(2, 3, 4, 5))) > 0


def test_valid_masks():
    assert valid_mask(get_task("semseg"), torch.tensor([[[0, 255]]])).tolist() == [[[[True, False]]]]
    assert valid_mask(get_task("depth"), torch.tensor([[[[0.0, 1.0]]]])).tolist() == [[[[False, True]]]]


def test_incompatible_teacher_is_a_clear_error():
    teacher = create_model("baseline-xs", tasks=resolve_tasks(["semseg", "depth"], {"semseg": 5}))
    with pytest.raises(ConfigError, match="cannot teach.*normals"):
        check_compatible(teacher, NYUD, "runs/x/teacher")
    other = create_model("baseline-xs", tasks=resolve_tasks(["semseg", "depth", "normals", "edge"], {"semseg": 13}))
    with pytest.raises(ConfigError, match="13 channels"):
        check_compatible(other, NYUD, "runs/x/teacher")
    with pytest.raises(ConfigError, match="unknown task"):
        distillation_loss(NYUD, DistillConfig(weights={"saliency": 1.0}), {})


def test_teacher_without_heads_is_a_clear_error_for_feature_kd():
    student = create_model("student-xs", tasks=NYUD)
    teacher = torch.nn.Conv2d(3, 3, 1)
    teacher.tasks = NYUD
    with pytest.raises(ConfigError, match="feature_weight"):
        Distiller(student, teacher, DistillConfig(feature_weight=1.0))


@pytest.mark.parametrize("feature_loss", ["mse", "cwd"])
def test_distillation_lowers_the_kd_loss(tmp_path, feature_loss):
    from edgemt.train.trainer import Trainer

    torch.manual_seed(0)
    teacher = create_model("baseline-xs", tasks=NYUD).eval()
    student = create_model("student-xs", tasks=NYUD, width=32, head_width=16, ranks=(2, 2, 2, 2))
    cfg = DistillConfig(gt_weight=0.0, feature_weight=1.0, feature_loss=feature_loss)
    model = Distiller(student, teacher, cfg)
    assert set(model.adapters) == {t.name for t in NYUD}
    assert not any(n.startswith("teacher") for n in model.state_dict())  # the teacher is not checkpointed
    images = torch.randn(16, 3, 64, 64)
    data = [
        {
            "image": images[i],
            "semseg": torch.zeros(64, 64, dtype=torch.long),
            "depth": torch.ones(1, 64, 64),
            "normals": torch.nn.functional.normalize(torch.ones(3, 64, 64), dim=0),
            "edge": torch.zeros(1, 64, 64),
        }
        for i in range(16)
    ]
    tcfg = TrainConfig(steps=40, batch_size=4, lr=3e-3, checkpoint_every=0, log_every=1, amp="off")
    loss_fn = distillation_loss(NYUD, cfg, {})
    trainer = Trainer(model, NYUD, data, tmp_path, tcfg, loss_fn=loss_fn, device="cpu", progress=False)
    result = trainer.fit(resume=False)
    kd = [sum(v for k, v in h.items() if k.startswith("loss/kd/")) for h in result.history if "loss" in h]
    assert sum(kd[-5:]) / 5 < 0.7 * sum(kd[:5]) / 5
    assert all(not p.requires_grad for p in teacher.parameters())
