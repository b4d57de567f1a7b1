"""Tests of implicitgrad.training: atomic checkpoints and bitwise-exact resumption."""

import os
import random

import numpy as np
import pytest
import torch

from implicitgrad import training
from implicitgrad.training import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    run_training,
    save_checkpoint,
)

NUM_STEPS = 12
EVERY = 5


def _seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Run:
    """A small model trained by Adam on data drawn from every kind of RNG inside the step."""

    def __init__(self, init_seed=0, interrupt_at=None):
        torch.manual_seed(init_seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=4, gamma=0.5)
        self.generators = {
            "torch": torch.Generator().manual_seed(init_seed + 1),
            "numpy": np.random.default_rng(init_seed + 2),
            "python": random.Random(init_seed + 3),
        }
        self.history = {}
        self.interrupt_at = interrupt_at

    @property
    def state_objects(self):
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def step(self, step):
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        x = torch.randn(16, 4) + torch.rand(1, 4, generator=self.generators["torch"])
        noise = float(np.random.standard_normal()) + self.generators["numpy"].normal()
        scale = random.random() + self.generators["python"].random()
        target = scale * x.sum(1, keepdim=True) + 0.01 * noise
        loss = (self.model(x) - target).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if step % 4 == 0:
            self.history.setdefault("eval", []).append([step, loss.item() * 2])
        return {"loss": loss.detach(), "lr": self.scheduler.get_last_lr()[0]}

    def train(self, path, resume=False):
        return run_training(
            self.step,
            NUM_STEPS,
            checkpoint_path=path,
            checkpoint_every=EVERY,
            resume=resume,
            state_objects=self.state_objects,
            generators=self.generators,
            history=self.history,
            progress=False,
        )


def _assert_same_state(a, b):
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name
    for key, state in a.optimizer.state_dict()["state"].items():
        other = b.optimizer.state_dict()["state"][key]
        assert all(torch.equal(state[k], other[k]) for k in state)
    assert a.history == b.history
    assert torch.equal(a.generators["torch"].get_state(), b.generators["torch"].get_state())
    assert a.generators["numpy"].random() == b.generators["numpy"].random()
    assert a.generators["python"].random() == b.generators["python"].random()


@pytest.fixture
def reference(tmp_path):
    _seed_everything(0)
    run = Run()
    history = run.train(tmp_path / "reference.pt")
    return run, history, (torch.get_rng_state(), np.random.get_state()[1].copy(), random.random())


@pytest.mark.parametrize("fresh_objects", [True, False], ids=["new-process", "same-objects"])
def test_interrupt_then_resume_is_bitwise_identical(tmp_path, reference, fresh_objects):
    expected, expected_history, expected_rng = reference
    assert len(expected_history["loss"]) == NUM_STEPS
    assert expected_history is expected.history

    path = tmp_path / "interrupted.pt"
    _seed_everything(0)
    run = Run(interrupt_at=7)
    with pytest.raises(KeyboardInterrupt):
        run.train(path)
    assert load_checkpoint(path)["step"] == EVERY
    assert len(run.history["loss"]) == 7

    if fresh_objects:
        _seed_everything(123)
        run = Run(init_seed=99)
    run.interrupt_at = None
    history = run.train(path, resume=True)

    assert history is run.history
    _assert_same_state(run, expected)
    assert torch.equal(torch.get_rng_state(), expected_rng[0])
    assert np.array_equal(np.random.get_state()[1], expected_rng[1])
    assert random.random() == expected_rng[2]
    assert load_checkpoint(path)["step"] == NUM_STEPS


def test_checkpoint_is_plain_and_loads_with_weights_only(tmp_path, reference):
    run, history, _ = reference
    checkpoint = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert checkpoint["step"] == NUM_STEPS
    assert set(checkpoint["state"]) == {"model", "optimizer", "scheduler"}
    assert checkpoint["history"] == history
    assert all(isinstance(v, float) for v in checkpoint["history"]["loss"])
    assert set(checkpoint["rng"]) == {"torch", "cuda", "numpy", "python", "generators"}
    assert set(checkpoint["rng"]["generators"]) == {"torch", "numpy", "python"}
    # The last two checkpoints are kept (the latest and the one before); no temporary files.
    assert sorted(os.listdir(tmp_path)) == ["reference.pt", "reference.pt.prev"]


def test_checkpoint_schedule(tmp_path, monkeypatch):
    saved = []

    def spy(path, state):
        saved.append(state["step"])

    monkeypatch.setattr(training, "save_checkpoint", spy)
    run_training(
        lambda step: None, 12, checkpoint_path=tmp_path / "a.pt", checkpoint_every=5, progress=False
    )
    assert saved == [5, 10, 12]
    saved.clear()
    run_training(
        lambda step: None, 10, checkpoint_path=tmp_path / "a.pt", checkpoint_every=5, progress=False
    )
    assert saved == [5, 10]
    saved.clear()
    run_training(
        lambda step: None,
        7,
        checkpoint_path=tmp_path / "a.pt",
        checkpoint_every=None,
        progress=False,
    )
    assert saved == [7]


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    path = tmp_path / "done.pt"
    calls = []
    run_training(lambda s: calls.append(s) or {"x": s}, 3, checkpoint_path=path, progress=False)
    again = run_training(
        lambda s: calls.append(s), 3, checkpoint_path=path, resume=True, progress=False
    )
    assert calls == [0, 1, 2] and again == {"x": [0, 1, 2]}


def test_resume_without_checkpoint_warns_and_starts_at_zero(tmp_path):
    calls = []
    with pytest.warns(UserWarning, match="starting from step 0"):
        run_training(
            calls.append, 2, checkpoint_path=tmp_path / "new.pt", resume=True, progress=False
        )
    assert calls == [0, 1]


def test_progress_bar_shows_metrics(capsys):
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm")
    history = run_training(lambda s: {"loss": 1.0 / (s + 1)}, 3, description="fit")
    assert history["loss"] == [1.0, 0.5, 1.0 / 3]
    err = capsys.readouterr().err
    assert "fit" in err and "3/3" in err and "loss" in err


@pytest.mark.parametrize("failure", ["save", "replace"])
@pytest.mark.parametrize("existing", [True, False])
def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch, failure, existing):
    path = tmp_path / "ckpt.pt"
    if existing:
        save_checkpoint(path, {"step": 1, "weight": torch.ones(3)})
    real_save = torch.save

    def broken_save(obj, file):
        real_save(obj, file)
        file.seek(file.tell() // 2)
        file.truncate()
        raise RuntimeError("disk full")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    if failure == "save":
        monkeypatch.setattr(torch, "save", broken_save)
    else:
        monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises((RuntimeError, OSError)):
        save_checkpoint(path, {"step": 2, "weight": torch.zeros(3)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == (["ckpt.pt"] if existing else [])
    if existing:
        restored = load_checkpoint(path)
        assert restored["step"] == 1 and torch.equal(restored["weight"], torch.ones(3))


def test_save_creates_folders_and_load_reports_missing(tmp_path):
    path = tmp_path / "deep" / "er" / "c.pt"
    save_checkpoint(path, {"step": 0})
    assert load_checkpoint(path) == {"step": 0}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip_through_a_file(tmp_path):
    generators = {
        "g": torch.Generator().manual_seed(1),
        "n": np.random.default_rng(2),
        "r": random.Random(3),
        "mt": np.random.Generator(np.random.MT19937(4)),
    }
    _seed_everything(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state(generators)})

    def draw():
        return (
            torch.rand(3),
            np.random.standard_normal(3),
            random.random(),
            torch.rand(2, generator=generators["g"]),
            generators["n"].random(2),
            generators["r"].random(),
            generators["mt"].random(2),
        )

    first = draw()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], generators)
    second = draw()
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint_path"):
        run_training(lambda s: None, 1, resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_training(lambda s: None, 1, checkpoint_every=0, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        run_training(lambda s: None, -1, progress=False)
    with pytest.raises(TypeError, match="state_objects\\['x'\\]"):
        run_training(lambda s: None, 1, state_objects={"x": 3}, progress=False)
    with pytest.raises(TypeError, match="generators\\['g'\\]"):
        run_training(lambda s: None, 1, generators={"g": 3}, progress=False)
    with pytest.raises(TypeError, match="one number"):
        run_training(lambda s: {"v": torch.ones(2)}, 1, progress=False)
    with pytest.raises(TypeError, match="history\\['bad'\\]\\[0\\]"):
        run_training(
            lambda s: None,
            1,
            checkpoint_path=tmp_path / "h.pt",
            history={"bad": [torch.ones(1)]},
            progress=False,
        )
    assert not (tmp_path / "h.pt").exists()

    model = torch.nn.Linear(1, 1)
    path = tmp_path / "m.pt"
    run_training(
        lambda s: None, 1, checkpoint_path=path, state_objects={"model": model}, progress=False
    )
    with pytest.raises(ValueError, match="same names"):
        run_training(
            lambda s: None,
            2,
            checkpoint_path=path,
            resume=True,
            state_objects={"net": model},
            progress=False,
        )
    with pytest.raises(ValueError, match="same names"):
        run_training(
            lambda s: None,
            2,
            checkpoint_path=path,
            resume=True,
            state_objects={"model": model},
            generators={"g": torch.Generator()},
            progress=False,
        )
    save_checkpoint(tmp_path / "other.pt", {"step": 1})
    with pytest.raises(ValueError, match="not written by run_training"):
        run_training(
            lambda s: None, 2, checkpoint_path=tmp_path / "other.pt", resume=True, progress=False
        )
