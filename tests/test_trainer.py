"""Trainer: exact resume, the NaN guard, checkpoints without pickle, DDP under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from edgemt.config import TrainConfig
from edgemt.errors import ConfigError, TrainingDiverged
from edgemt.models import create_model
from edgemt.tasks import resolve_tasks
from edgemt.train.checkpoint import latest_checkpoint
from edgemt.train.trainer import Trainer, lr_factor

TASKS = resolve_tasks(["semseg", "depth", "normals", "edge"], {"semseg": 5})


class RandomScenes(Dataset):
    """Random images with labels in the task conventions; augmentation (a random flip)
    seeded per (epoch, index) like the real datasets, so resume must reproduce it."""

    def __init__(self, n: int = 24, size: tuple[int, int] = (32, 32)) -> None:
        g = torch.Generator().manual_seed(0)
        h, w = size
        self.images = torch.randn(n, 3, h, w, generator=g)
        self.semseg = torch.randint(0, 5, (n, h, w), generator=g)
        self.depth = torch.rand(n, 1, h, w, generator=g) + 0.5
        self.normals = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
        self.edge = (torch.rand(n, 1, h, w, generator=g) > 0.9).float()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        s = {
            "image": self.images[i],
            "id": str(i),
            "semseg": self.semseg[i],
            "depth": self.depth[i],
            "normals": self.normals[i],
            "edge": self.edge[i],
        }
        if torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(self.epoch * 1000 + i)).item():
            s = {k: (v.flip(-1) if torch.is_tensor(v) else v) for k, v in s.items()}
            s["normals"] = s["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
        return s


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, lr=1e-3, checkpoint_every=5, log_every=1, seed=3, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _model():
    torch.manual_seed(0)
    return create_model("baseline-xs", tasks=TASKS)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    ds = RandomScenes()
    full = _model()
    Trainer(full, TASKS, ds, tmp_path / "full", _cfg(), progress=False, device="cpu").fit()

    # Interrupted at step 7 (checkpoints at 5 and 7), then resumed by a fresh trainer and model.
    Trainer(_model(), TASKS, ds, tmp_path / "part", _cfg(), progress=False, device="cpu").fit(stop_at=7)
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step-0000007.json"
    resumed = _model()
    res = Trainer(resumed, TASKS, ds, tmp_path / "part", _cfg(), progress=False, device="cpu").fit()
    assert res.steps == 12
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_without_checkpoint_differs_from_continuing(tmp_path: Path) -> None:
    # Guards the test above: a run restarted from scratch for 5 more steps does not match.
    ds = RandomScenes()
    full = _model()
    Trainer(full, TASKS, ds, tmp_path / "full", _cfg(), progress=False, device="cpu").fit()
    other = _model()
    Trainer(other, TASKS, ds, tmp_path / "o", _cfg(seed=4), progress=False, device="cpu").fit()
    assert not all(torch.equal(a, b) for a, b in zip(_weights(full).values(), _weights(other).values()))


def test_checkpoint_files_are_safetensors_and_json(tmp_path: Path) -> None:
    Trainer(_model(), TASKS, RandomScenes(), tmp_path, _cfg(steps=5), progress=False, device="cpu").fit()
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step-0000005.json", "step-0000005.safetensors"]
    meta = json.loads((tmp_path / "checkpoints" / "step-0000005.json").read_text())
    assert meta["step"] == 5 and meta["optimizer"]["param_groups"]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    model = _model()
    calls = {"n": 0}

    def poisoned(out, batch, m):
        calls["n"] += 1
        loss = sum(v.float().mean() for v in out.values())
        if calls["n"] == 8:
            loss = loss * float("nan")
        return loss, {}

    tr = Trainer(model, TASKS, RandomScenes(), tmp_path, _cfg(), loss_fn=poisoned, progress=False, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"step 7: loss is nan.*step-0000005\.json"):
        tr.fit()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000005.json"


def test_poly_schedule_and_warmup() -> None:
    cfg = _cfg(steps=10, warmup_steps=2, poly_power=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.5)
    assert lr_factor(1, cfg) == pytest.approx(1.0)
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == 0.0


def test_batch_larger_than_split_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.batch_size"):
        Trainer(_model(), TASKS, RandomScenes(n=3), tmp_path, _cfg(batch_size=4), progress=False, device="cpu")


DDP_SCRIPT = r"""
import sys, json, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.test_trainer import RandomScenes, _cfg, _model, TASKS
from edgemt.train.trainer import Trainer
ds = RandomScenes()
tr = Trainer(_model(), TASKS, ds, {out!r}, _cfg(steps=6), val_set=RandomScenes(n=4), progress=False, device="cpu")
res = tr.fit()
w = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, w)
same = all(torch.equal(gathered[0], g) for g in gathered)
# One file per rank: two processes printing to one stdout can interleave their lines.
with open({out!r} + f"-rank{{dist.get_rank()}}.json", "w") as f:
    json.dump({{"rank": dist.get_rank(), "world": dist.get_world_size(), "same": same,
               "metrics": sorted(res.metrics), "steps": res.steps}}, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_evaluate(tmp_path: Path) -> None:
    pytest.importorskip("edgemt.metrics")
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=root, out=str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"run-rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["world"] == 2 and r["same"] and r["steps"] == 6 for r in rows)
    main = next(r for r in rows if r["rank"] == 0)
    assert main["metrics"] == ["depth", "edge", "normals", "semseg"]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000006.json"


def test_time_budget_stops_training_and_decays_the_schedule(tmp_path: Path) -> None:
    cfg = _cfg(steps=10**6, time_budget_minutes=0.08, warmup_steps=0, log_every=1, checkpoint_every=0)
    tr = Trainer(_model(), TASKS, RandomScenes(), tmp_path, cfg, progress=False, device="cpu")
    lrs = []
    orig = tr._set_lr
    tr._set_lr = lambda step, progress=None: lrs.append(orig(step, progress)) or lrs[-1]
    res = tr.fit()
    assert 1 < res.steps < 10**6  # stopped by the clock, not by the step count
    assert lrs[0] > lrs[-1] and all(a >= b for a, b in zip(lrs, lrs[1:]))  # poly over elapsed time
    assert lrs[-1] < 0.5 * cfg.lr
