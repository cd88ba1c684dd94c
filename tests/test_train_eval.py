"""Training (contrastive and vision-only) and evaluation metrics on the tiny open_clip model."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from chronomerge.config import ConfigError, TrainSection, validate
from chronomerge.data import catalog
from chronomerge.data.generate import Split, generate
from chronomerge.evaluate import acc_bwt, chance, retrieval_recall, summarize, zero_shot_accuracy
from chronomerge.models import create_model, get_tokenizer
from chronomerge.train import caption_classes, class_texts, is_text_param, lr_at, train


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def task():
    return generate(catalog.ALL["new-shapes-photo"], "train", 0, size_factor=0.2)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    cfg = TrainSection(steps=100, lr=1.0, warmup=0.1)
    assert [round(lr_at(s, cfg), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) < 0.001


def test_contrastive_training_lowers_the_loss_and_is_deterministic(task, tok):
    cfg = TrainSection(steps=12, batch_size=32, lr=1e-3)
    a, b = create_model(seed=0), create_model(seed=0)
    ra = train(a, task, cfg, tokenizer=tok)
    rb = train(b, task, cfg, tokenizer=tok)
    assert all(torch.equal(ra.state[k], rb.state[k]) for k in ra.state)
    assert np.mean(ra.losses[-3:]) < np.mean(ra.losses[:3])
    assert set(ra.exp_avg_sq) == {n for n, _ in a.named_parameters()}
    assert all((v >= 0).all() for v in ra.exp_avg_sq.values())


def test_vision_only_training_keeps_the_text_tower_and_fits_the_task(task, tok):
    model = create_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    acc0 = zero_shot_accuracy(model, tok, task, "cpu")
    res = train(model, task, TrainSection(steps=60, batch_size=32, lr=2e-3, mode="vision"), tokenizer=tok)
    for k, v in res.state.items():
        if is_text_param(k):
            assert torch.equal(v, before[k]), k
    assert not torch.equal(res.state["visual.proj"], before["visual.proj"])
    assert not any(is_text_param(k) for k in res.exp_avg_sq)
    assert zero_shot_accuracy(model, tok, task, "cpu") > acc0 + 0.2


def test_vision_only_training_on_a_retrieval_task_learns_its_captions(tok):
    """A retrieval task's classes are its distinct captions: vision-only training raises recall@5, the
    task's score (trained on the object labels instead, it rose 0.05 -> 0.07 here, against 0.34)."""
    task = generate(catalog.ALL["objects-mosaic-captions"], "train", 0, size_factor=0.2)
    as_classes = caption_classes(task)
    assert len(as_classes.classes) == len(set(task.captions)) > 3 * len(task.classes)
    assert [as_classes.classes[i] for i in as_classes.labels] == list(task.captions)
    model = create_model(seed=0)
    text = copy.deepcopy(model.token_embedding.weight)
    before = retrieval_recall(model, tok, task, "cpu")
    train(model, task, TrainSection(steps=60, batch_size=32, lr=2e-3, mode="vision"), tokenizer=tok)
    assert torch.equal(model.token_embedding.weight, text)
    assert retrieval_recall(model, tok, task, "cpu") > before + 0.15


def test_contrastive_training_on_class_prompts_fits_the_classes(task, tok):
    """train.text=classes pairs each image with its class prompt (FLYP): the task's zero-shot accuracy
    rises where its captions, which name colour, size and position too, barely move it (0.25 -> 0.34 here,
    against 0.68); a retrieval task keeps its captions."""
    prompts = class_texts(task).captions
    assert prompts[:2] == [task.templates[i].format(c=task.classes[task.labels[i]]) for i in range(2)]
    retrieval = generate(catalog.ALL["objects-mosaic-captions"], "test", 0, size_factor=0.05)
    assert class_texts(retrieval).captions == retrieval.captions
    model = create_model(seed=0)
    acc0 = zero_shot_accuracy(model, tok, task, "cpu")
    train(model, task, TrainSection(steps=60, batch_size=32, lr=2e-3, text="classes"), tokenizer=tok)
    assert zero_shot_accuracy(model, tok, task, "cpu") > acc0 + 0.25


def test_frozen_text_tower_in_contrastive_mode(task, tok):
    model = create_model(seed=0)
    before = model.state_dict()["token_embedding.weight"].clone()
    train(model, task, TrainSection(steps=3, batch_size=16, train_text=False), tokenizer=tok)
    assert torch.equal(model.state_dict()["token_embedding.weight"], before)


def test_replay_mixes_in_the_pretraining_pool_and_earlier_tasks(task, tok):
    """Each replay source's images shape the trained weights: the same run with that source's images
    inverted (same captions, same batch indices) ends elsewhere, and so does a run without replay."""
    pool = generate(catalog.PRETRAIN, "train", 0, size_factor=0.01)
    earlier = generate(catalog.ALL["letters-photo"], "train", 0, size_factor=0.1)
    inverted = lambda s: dataclasses.replace(s, images=255 - s.images)  # noqa: E731
    cfg = TrainSection(steps=3, batch_size=16, replay_pretrain=0.25, replay_previous=0.25)

    def run(cfg, pool, earlier):
        return train(create_model(seed=0), task, cfg, tokenizer=tok, replay_pool=pool, previous=[earlier]).state

    both = run(cfg, pool, earlier)
    w = "visual.conv1.weight"
    assert not torch.equal(both[w], run(cfg, inverted(pool), earlier)[w])
    assert not torch.equal(both[w], run(cfg, pool, inverted(earlier))[w])
    assert not torch.equal(both[w], run(TrainSection(steps=3, batch_size=16), pool, earlier)[w])
    assert all(torch.isfinite(v).all() for v in both.values())


@pytest.mark.parametrize("section,pattern", [
    ({"mode": "lora"}, r"train.mode: 'lora' is not allowed; expected one of 'clip', 'vision' or 'linear'"),
    ({"mode": "vision", "replay_pretrain": 0.2}, "train: replay needs captions"),
    ({"replay_pretrain": 0.6, "replay_previous": 0.5}, r"train: replay_pretrain \+ replay_previous must be < 1"),
    ({"mode": "vision", "text": "classes"}, "train: text 'classes' chooses what contrastive fine-tuning pairs"),
    ({"text": "labels"}, r"train.text: 'labels' is not allowed; expected one of 'captions' or 'classes'"),
    ({"steps": 0}, r"train.steps: Input should be greater than or equal to 1 \(got 0\)"),
    ({"lr": 0}, r"train.lr: Input should be greater than 0 \(got 0\)"),
])
def test_bad_training_config_is_refused_by_the_schema_naming_the_field(section, pattern):
    """train() takes the validated section: the schema is the one place its values are checked."""
    with pytest.raises(ConfigError, match=pattern):
        validate({"train": section})


def test_replay_of_the_pretraining_pool_needs_the_pool(task, tok):
    with pytest.raises(ValueError, match="needs the pretraining pool"):
        train(create_model(), task, TrainSection(replay_pretrain=0.2), tokenizer=tok)


def test_metrics():
    r = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.1], [0.5, 0.6, 0.9]]
    m = acc_bwt(r)
    assert m["ACC"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    lower = [row[:i + 1] for i, row in enumerate(r)]  # as the pipeline records it: row t holds tasks 0..t
    assert acc_bwt(lower) == m
    # after the first two steps: the 2x2 top-left block, whatever later rows hold
    assert acc_bwt(r, 2) == {"ACC": pytest.approx((0.7 + 0.8) / 2), "BWT": pytest.approx(0.7 - 0.9)}
    assert acc_bwt([[0.4]]) == {"ACC": 0.4, "BWT": 0.0}
    # a task without a test set (None) is left out of both; with nothing scored both are None
    assert acc_bwt([[None], [None, 0.6], [None, 0.5, 0.9]]) == {"ACC": pytest.approx(0.7), "BWT": pytest.approx(-0.1)}
    assert acc_bwt([[None]]) == {"ACC": None, "BWT": None}
    with pytest.raises(ValueError, match="row i to hold tasks 0..i"):
        acc_bwt([[0.1], [0.2]])
    with pytest.raises(ValueError, match="t=4"):
        acc_bwt(r, 4)
    s = summarize({"a": 0.2, "b": 0.4, "z": 0.8}, ["a", "b"], ["z"])
    assert s["A_KA"] == pytest.approx(0.3) and s["A_ZS"] == 0.8 and s["GM"] == pytest.approx(math.sqrt(0.24))
    splits = {"x": Split(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64), ["a", "b"], [], [""]),
              "y": Split(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64), ["a", "b", "c", "d"], [], [""])}
    assert chance(splits) == pytest.approx(0.375)


def test_retrieval_recall_of_a_perfect_and_a_random_encoder(tok):
    split = generate(catalog.ALL["objects-mosaic-captions"], "test", 0, size_factor=0.25)

    class Oracle(torch.nn.Module):
        """Encodes an image and its caption to the same one-hot vector."""

        def __init__(self, captions):
            super().__init__()
            self.ids = {c: i for i, c in enumerate(sorted(set(captions)))}
            self.images = {split.images[i].tobytes(): self.ids[c] for i, c in enumerate(captions)}
            self.dim = len(self.ids)
            self.preprocess_cfg = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}  # read by model_input

        def encode_image(self, x, normalize=True):
            raw = np.round(((x.permute(0, 2, 3, 1) * 0.25 + 0.5) * 255).numpy()).astype(np.uint8)
            return torch.nn.functional.one_hot(torch.tensor([self.images[r.tobytes()] for r in raw]), self.dim).float()

        def encode_text(self, tokens, normalize=True):
            return torch.nn.functional.one_hot(torch.tensor(self._last), self.dim).float()

    oracle = Oracle(split.captions)
    texts = sorted(set(split.captions))

    def tokenizer(batch):
        oracle._last = [oracle.ids[t] for t in batch]
        return torch.zeros(len(batch), 1)

    assert retrieval_recall(oracle, tokenizer, split, "cpu") == 1.0
    assert len(texts) > 10
    assert retrieval_recall(create_model(seed=0), tok, split, "cpu") < 0.7


def test_training_off_a_terminal_reports_progress_lines(task, tok, capsys, monkeypatch):
    """Where output is a file or a pipe, a long training prints step, loss, elapsed and time left."""
    import chronomerge.progress

    monkeypatch.setattr(chronomerge.progress, "INTERVAL", 0.0)  # a line after every step
    train(create_model(seed=0), task, TrainSection(steps=4, batch_size=16), tokenizer=tok, progress="train t-demo")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines[:4]] == [f"train t-demo: step {i}/4 ({25 * i}%)" for i in (1, 2, 3, 4)]
    assert all(" loss " in line and " elapsed, about " in line and line.endswith(" left") for line in lines[:4])
    assert lines[4].startswith("train t-demo: done in ")
    train(create_model(seed=0), task, TrainSection(steps=2, batch_size=16), tokenizer=tok)  # no label: silent
    assert capsys.readouterr().err == ""
