"""Damaged, foreign and half-written checkpoints: a clear error naming the file, a fallback
to the previous good checkpoint, no leftovers, and the file mode the umask asks for."""

from __future__ import annotations

import os

import pytest
import torch

from implicitgrad.training import (
    CheckpointError,
    load_checkpoint,
    previous_path,
    run_training,
    save_checkpoint,
)

STEPS, EVERY = 12, 5


class Trainer:
    """A linear model trained by SGD on data drawn from the global torch RNG."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1).double()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.history = {}

    def step(self, step):
        x = torch.randn(8, 3, dtype=torch.float64)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def train(self, path, steps=STEPS, resume=False):
        return run_training(self.step, steps, checkpoint_path=path, checkpoint_every=EVERY, resume=resume,
                            state_objects={"model": self.model, "optimizer": self.optimizer},
                            history=self.history, progress=False)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _flip_a_weight_bit(path):
    """Flips one bit inside the stored bytes of the model's weight."""
    weight = load_checkpoint(path)["state"]["model"]["weight"]
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes())
    assert at >= 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = [_truncate, _empty, _flip_a_weight_bit]


@pytest.mark.parametrize("damage", DAMAGE, ids=["truncated", "empty", "bit-flipped"])
def test_load_names_the_damaged_file(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 3, "state": {"model": {"weight": torch.randn(4, 3, dtype=torch.float64)}}})
    damage(path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*damaged") as caught:
        load_checkpoint(path)
    assert caught.value.damaged


@pytest.mark.parametrize("damage", DAMAGE, ids=["truncated", "empty", "bit-flipped"])
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    reference = Trainer()
    expected = reference.train(tmp_path / "reference.pt")

    path = tmp_path / "run.pt"
    first = Trainer()
    first.train(path, steps=10)  # checkpoints after steps 5 and 10: run.pt.prev holds step 5
    assert load_checkpoint(previous_path(path))["step"] == 5
    damage(path)
    again = Trainer()
    with pytest.warns(UserWarning) as record:
        history = again.train(path, resume=True)
    messages = [str(w.message) for w in record]
    assert any("run.pt" in m and "damaged" in m for m in messages), messages
    assert any("previous checkpoint" in m and "step 5" in m for m in messages), messages
    assert history == expected  # steps 5..11 run again from the state after step 5
    for p, q in zip(again.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q)


def test_both_checkpoints_damaged_is_an_error_naming_both(tmp_path):
    path = tmp_path / "run.pt"
    Trainer().train(path, steps=10)
    _truncate(path)
    _empty(previous_path(path))
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(CheckpointError, match=r"run\.pt.*run\.pt\.prev"):
        Trainer().train(path, resume=True)


def test_missing_latest_resumes_from_the_previous(tmp_path):
    path = tmp_path / "run.pt"
    Trainer().train(path, steps=10)
    path.unlink()  # as if killed between keeping the previous and writing the latest
    with pytest.warns(UserWarning, match="previous checkpoint"):
        history = Trainer().train(path, resume=True)
    assert len(history["loss"]) == STEPS


@pytest.mark.parametrize("content", [torch.ones(3), [1, 2, 3]], ids=["tensor", "list"])
def test_a_file_holding_a_tensor_or_a_list_is_named(tmp_path, content):
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    kind = type(content).__name__
    with pytest.raises(CheckpointError, match=rf"weights\.pt.*holds a {kind}, not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"weights\.pt.*holds a {kind}"):
        run_training(lambda s: None, 2, checkpoint_path=path, resume=True, progress=False)


def test_stale_temporary_files_are_removed(tmp_path):
    path = tmp_path / "run.pt"
    stale = [tmp_path / f".run.pt.{tag}.tmp" for tag in ("abc123", "killed")]
    for s in stale:
        s.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.x.tmp"  # another checkpoint's: left alone
    other.write_bytes(b"")
    save_checkpoint(path, {"step": 1})
    assert not any(s.exists() for s in stale) and other.exists()
    stale[0].write_bytes(b"again")
    run_training(lambda s: None, 1, checkpoint_path=path, progress=False)
    assert not stale[0].exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.pt", {"step": 1})
        torch.save({"step": 1}, tmp_path / "plain.pt")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "c.pt").st_mode & 0o777 == mode
    assert os.stat(tmp_path / "plain.pt").st_mode & 0o777 == mode


def test_the_last_two_checkpoints_are_kept(tmp_path):
    path = tmp_path / "run.pt"
    Trainer().train(path)
    assert load_checkpoint(path)["step"] == STEPS and load_checkpoint(previous_path(path))["step"] == 10
    assert sorted(os.listdir(tmp_path)) == ["run.pt", "run.pt.prev"]
