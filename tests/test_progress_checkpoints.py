"""Progress checkpoints inside a training (`chronomerge.resume`): a training stopped at step k and run
again resumes at its last checkpoint and ends bit-identical to an uninterrupted one (weights, AdamW
second moments, losses), in every training mode and in the alignment pass; partial, corrupt and
foreign checkpoints are skipped with a line. The stop here is an exception raised at the kill point
(in-process, fast); `tests/test_resume.py` SIGKILLs real commands."""
import json

import pytest
import torch

from chronomerge import faults
from chronomerge.align import align_projection
from chronomerge.config import TrainSection
from chronomerge.data import catalog
from chronomerge.data.generate import generate
from chronomerge.models import create_model, get_tokenizer
from chronomerge.resume import Checkpointing, stage_progress
from chronomerge.train import train


class Stopped(Exception):
    pass


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def task():
    return generate(catalog.ALL["new-shapes-photo"], "train", 0, size_factor=0.1)


def stop_at(monkeypatch, name):
    """Make the kill point `name` raise instead (the process goes on: a stand-in for SIGKILL)."""
    real = faults.point

    def point(n):
        if n == name:
            raise Stopped(n)
        real(n)

    monkeypatch.setattr(faults, "point", point)


def run(task, tok, cfg, ck=None):
    return train(create_model(seed=0), task, cfg, tokenizer=tok, checkpointing=ck)


def same(a, b):
    assert a.state.keys() == b.state.keys() and a.exp_avg_sq.keys() == b.exp_avg_sq.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert all(torch.equal(a.exp_avg_sq[k], b.exp_avg_sq[k]) for k in a.exp_avg_sq)
    assert a.losses == b.losses


@pytest.mark.parametrize("mode", ["clip", "vision", "linear"])
def test_a_training_stopped_at_step_k_resumes_at_its_last_checkpoint_bit_identically(tmp_path, task, tok,
                                                                                       monkeypatch, capsys, mode):
    cfg = TrainSection(steps=9, batch_size=16, lr=1e-3, mode=mode)
    plain = run(task, tok, cfg)
    ck = Checkpointing(tmp_path, "train", every_seconds=None, every_steps=2)
    same(run(task, tok, cfg, ck), plain)  # checkpointing does not change the result
    assert ck.written == 4 and ck.resumed_from == 0
    for f in tmp_path.iterdir():
        f.unlink()
    stop_at(monkeypatch, "train:step:5")
    with pytest.raises(Stopped):
        run(task, tok, cfg, Checkpointing(tmp_path, "train", every_seconds=None, every_steps=2))
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "step-000000002.json", "step-000000002.safetensors", "step-000000004.json", "step-000000004.safetensors"]
    monkeypatch.undo()
    capsys.readouterr()
    again = Checkpointing(tmp_path, "train", every_seconds=None, every_steps=2)
    same(run(task, tok, cfg, again), plain)
    assert again.resumed_from == 4
    assert "resumed from its progress checkpoint at step 4/9" in capsys.readouterr().err


def test_partial_corrupt_and_foreign_checkpoints_are_skipped_with_a_line(tmp_path, task, tok, monkeypatch, capsys):
    cfg = TrainSection(steps=9, batch_size=16, lr=1e-3)
    plain = run(task, tok, cfg)
    # killed while writing step 6's checkpoint: its tensors are on disk, its record is not
    stop_at(monkeypatch, "train:checkpoint:6")
    with pytest.raises(Stopped):
        run(task, tok, cfg, Checkpointing(tmp_path, "train", every_seconds=None, every_steps=2, keep=3))
    monkeypatch.undo()
    assert (tmp_path / "step-000000006.safetensors").exists() and not (tmp_path / "step-000000006.json").exists()
    # and the newest complete one is corrupt: one byte flipped in its tensors
    blob = tmp_path / "step-000000004.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    capsys.readouterr()
    ck = Checkpointing(tmp_path, "train", every_seconds=None, every_steps=None)
    same(run(task, tok, cfg, ck), plain)
    err = capsys.readouterr().err
    assert ck.resumed_from == 2
    assert "step-000000006.safetensors: its record is missing (a write cut short)" in err
    assert "step-000000004: its tensors do not match their recorded SHA-256 (corrupt)" in err
    assert "at step 2/9" in err
    # another configuration's checkpoint in the folder is never resumed
    stop_at(monkeypatch, "train:step:3")
    with pytest.raises(Stopped):
        run(task, tok, cfg, Checkpointing(tmp_path, "train", every_seconds=None, every_steps=2))
    monkeypatch.undo()
    capsys.readouterr()
    other = Checkpointing(tmp_path, "train", every_seconds=None, every_steps=None)
    same(run(task, tok, cfg.model_copy(update={"lr": 5e-4}), other),
         run(task, tok, cfg.model_copy(update={"lr": 5e-4})))
    assert other.resumed_from == 0 and "another training's (its configuration differs)" in capsys.readouterr().err
    # a record that is not JSON
    (tmp_path / "step-000000008.json").write_text("{not json")
    capsys.readouterr()
    assert Checkpointing(tmp_path, "train").resume("x") is None
    assert "its record is not valid JSON of a progress checkpoint" in capsys.readouterr().err


def test_the_alignment_pass_resumes_bit_identically(tmp_path, task, monkeypatch):
    def align(ck=None):
        model, ref = create_model(seed=1), create_model(seed=0)
        return align_projection(model, ref, task, batch_size=8, checkpointing=ck)

    plain = align()
    stop_at(monkeypatch, "align:step:5")
    with pytest.raises(Stopped):
        align(Checkpointing(tmp_path, "align", every_seconds=None, every_steps=2))
    monkeypatch.undo()
    ck = Checkpointing(tmp_path, "align", every_seconds=None, every_steps=2)
    assert torch.equal(align(ck), plain) and ck.resumed_from == 4


def test_the_time_interval_stretches_to_keep_writes_under_two_percent(tmp_path):
    ck = Checkpointing(tmp_path, "train", every_seconds=1e-6)
    ck.resume("x")
    ck.save(1, 10, {"w": torch.zeros(1 << 20)}, "x", {})
    took = ck.write_seconds
    assert took > 0 and not ck.due(2)  # a write just finished: the next waits 50 × its duration
    ck._last -= 49 * took
    assert not ck.due(2)
    ck._last -= took + 1e-3
    assert ck.due(2)
    rec = json.loads((tmp_path / "step-000000001.json").read_text())
    assert rec["step"] == 1 and rec["total"] == 10 and len(rec["sha256"]) == 64


def test_a_stage_removes_its_progress_when_it_returns_and_keeps_it_when_it_fails(tmp_path):
    with stage_progress(tmp_path, "train-abc") as folder:
        ck = Checkpointing.here(tmp_path, "train", every_steps=1)
        assert ck.folder == folder == tmp_path / "progress" / "train-abc"
        ck.save(1, 2, {"w": torch.ones(3)}, "x", {})
    assert not folder.exists() and Checkpointing.here(tmp_path, "train") is None  # outside a stage: none
    with pytest.raises(Stopped), stage_progress(tmp_path, "train-abc"):
        Checkpointing.here(tmp_path, "train").save(1, 2, {"w": torch.ones(3)}, "x", {})
        raise Stopped
    assert (folder / "step-000000001.json").exists()
