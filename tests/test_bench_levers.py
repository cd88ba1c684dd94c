"""The regime levers of bench/benchmark_properties.py and bench/mergeability_diagnosis.py do what they say."""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import chronomerge.benchmark as benchmark
from chronomerge.config import TrainSection
from chronomerge.data import catalog
from chronomerge.data.generate import generate
from chronomerge.data.streams import build_stream
from chronomerge.models import create_model, get_tokenizer
from chronomerge.store import CheckpointStore
from chronomerge.train import train

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import levers  # noqa: E402
from conftest import perturb  # noqa: E402


def parsed(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    levers.add_arguments(p, trainable=True)
    return p, p.parse_args(argv)


@pytest.mark.parametrize("argv,names", [(["--n-train", "4800"], "(--data)"), (["--pool", "80000"], "(--data)"),
                                        (["--tail-share", "0.1"], "(--data)"),
                                        (["--tail-share", "1.5", "--data", "d"], "expected a number in (0, 1)"),
                                        (["--pretrain-logit-scale", "100"], "its own --store")])
def test_a_lever_that_changes_the_data_or_an_unkeyed_base_needs_its_own_folder(argv, names, capsys):
    with pytest.raises(SystemExit):
        levers.apply(*parsed(*argv))
    assert names in capsys.readouterr().err


def test_levers_patch_this_process_and_are_recorded(monkeypatch):
    monkeypatch.setattr(catalog, "ALL", dict(catalog.ALL))
    monkeypatch.setattr(catalog, "ADAPTATION", catalog.ADAPTATION)
    monkeypatch.setattr(catalog, "PRETRAIN", catalog.PRETRAIN)
    monkeypatch.setattr(benchmark, "create_model", benchmark.create_model)
    record = levers.apply(*parsed("--n-train", "64", "--pool", "256", "--tail-share", "0.1",
                                  "--pretrain-logit-scale", "100", "--data", "d", "--store", "s",
                                  "--train", "visual.proj"))
    assert record == {"n_train": 64, "pool": 256, "tail_share": 0.1, "pretrain_logit_scale": 100.0,
                      "trainable": ["visual.proj"]}
    assert {d.n_train for d in catalog.ADAPTATION} == {64} and catalog.ALL[catalog.ADAPTATION[0].name].n_train == 64
    assert catalog.PRETRAIN.n_train == 256 and catalog.ALL[catalog.PRETRAIN.name].n_train == 256
    assert [share for _, share in catalog.ALL[catalog.PRETRAIN.name].mix] == pytest.approx([0.9, 0.1])
    pool = generate(catalog.PRETRAIN, "train", 0)
    head = set(catalog.PRETRAIN.mix[0][0].concepts)
    tail_only = sum(catalog.PRETRAIN.concepts[y] not in head for y in pool.labels)
    assert 0 < tail_only < 0.1 * 256  # only the tail shows the adaptation concepts
    model = benchmark.create_model(seed=0)
    assert "logit_scale" not in dict(model.named_parameters())
    assert math.exp(float(model.state_dict()["logit_scale"])) == pytest.approx(100.0)


@pytest.mark.parametrize("mode,names", [("vision", ["visual.proj"]), ("clip", ["visual.proj", "text_projection"])])
def test_the_train_lever_fine_tunes_only_the_named_tensors(mode, names):
    task = generate(catalog.ALL["new-shapes-photo"], "train", 0, size_factor=0.1)
    model = create_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = levers.fine_tune(train, names)(model, task, TrainSection(steps=3, batch_size=16, lr=1e-2, mode=mode),
                                         tokenizer=get_tokenizer())
    changed = {k for k, v in res.state.items() if not torch.equal(v, before[k])}
    assert changed == set(names)


def test_benchmark_properties_pretrains_its_base_with_the_pretrain_overrides(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "benchmark_properties.py"), "--parts", "zs,headroom",
                          "--device", "cpu", "--seed", "1", "--tasks", "3", "--set", "train.steps=2",
                          "--set", "pretrain.steps=3", "--set", "pretrain.batch_size=8",
                          "--data", str(tmp_path / "d"), "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, check=True).stdout
    line = json.loads(out)
    # seed 1's third task is caption retrieval: no classes, so no probe
    tasks = [t.name for t in build_stream("dataset-incremental", 3, 1)]
    assert [r["task"] for r in line["headroom"]] == tasks and "captions" in tasks[2]
    assert [r["probe"] is None for r in line["headroom"]] == [False, False, True]
    assert all(0 <= r[k] <= 100 for r in line["headroom"] for k in ("zero_shot", "vision_expert"))
    assert (line["pretrain"]["steps"], line["pretrain"]["batch_size"]) == (3, 8)
    store = CheckpointStore(tmp_path / "s")
    (base,) = store.ids()
    assert base.startswith(line["base"])
    assert (store.meta(base)["hparams"]["steps"], store.meta(base)["hparams"]["batch_size"]) == (3, 8)


def test_benchmark_properties_refuses_a_stream_at_another_width():
    r = subprocess.run([sys.executable, str(BENCH / "benchmark_properties.py"), "--parts", "streams", "--width", "96"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not take --width or --layers" in r.stderr


def test_the_width_and_depth_levers_name_a_model_of_that_size():
    assert levers.arch(parsed()[1]) == "chronoclip-tiny"
    arch = levers.arch(parsed("--width", "96", "--layers", "3")[1])
    assert arch["name"] == "chronoclip-tiny-w96-l3"  # its own base store key (`benchmark.base_recipe`)
    model = create_model(arch)
    assert model.visual.proj.shape == (96, 96) and model.text_projection.shape == (96, 96)
    assert len(model.visual.transformer.resblocks) == len(model.transformer.resblocks) == 3
    assert levers.arch(parsed("--layers", "4")[1])["name"] == "chronoclip-tiny-w64-l4"


def random_base_and_visual_tau(scale: float) -> tuple[torch.nn.Module, dict, dict]:
    """A random tiny CLIP (seed 0), its weights θ0, and a random task vector of that scale on the image tower."""
    torch.manual_seed(0)
    base = create_model("chronoclip-tiny").eval()
    theta0 = base.state_dict()
    expert = perturb(theta0, seed=0, scale=scale, only="visual.")
    return base, theta0, {n: expert[n] - theta0[n] for n in theta0}


def loaded(state: dict) -> torch.nn.Module:
    m = create_model("chronoclip-tiny").eval()
    m.load_state_dict(state)
    return m


def two_class_split(labelled_by, tok):
    """64 random images, two classes, each image labelled as `labelled_by` predicts it."""
    from mergeability_diagnosis import margins

    from chronomerge.data.generate import Split

    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8).numpy()
    split = Split(images, np.zeros(64, np.int64), ["circle", "square"], ["a photo of a {c}."], [""] * 64)
    split.labels = (margins(labelled_by, tok, split) < 0).astype(np.int64)
    return split


def test_tangent_evaluation_is_theta0_at_theta0_and_linear_in_the_weights():
    from mergeability_diagnosis import Tangent

    base, theta0, tau = random_base_and_visual_tau(0.02)

    def weights(a: float) -> dict:
        return {n: theta0[n] + a * tau[n] for n in theta0}

    def network(a: float) -> torch.nn.Module:
        return loaded(weights(a))

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f0 = base.encode_image(x)
        tangent = {a: Tangent(base, weights(a)).encode_image(x) - f0 for a in (0.0, 1e-3, 1.0, 2.0)}
        assert tangent[0.0].abs().max() < 1e-5
        assert torch.allclose(tangent[2.0], 2 * tangent[1.0], atol=1e-4)  # linear in θ − θ0 ...
        assert not torch.allclose(network(2.0).encode_image(x) - f0, 2 * (network(1.0).encode_image(x) - f0), atol=1e-4)
        # ... where the network is not, and equal to it to first order
        assert torch.allclose(tangent[1e-3], network(1e-3).encode_image(x) - f0, rtol=0.05, atol=1e-6)
        tokens = get_tokenizer("chronoclip-tiny")(["a photo"])
        assert torch.equal(Tangent(base, weights(1.0)).encode_text(tokens), base.encode_text(tokens))


def test_path_alpha_is_where_the_tangent_weight_path_turns_right():
    from mergeability_diagnosis import Tangent, crossing, margins

    base, theta0, tau = random_base_and_visual_tau(0.3)

    def at(a: float) -> Tangent:
        return Tangent(base, {n: theta0[n] + a * tau[n] for n in theta0})

    tok = get_tokenizer("chronoclip-tiny")
    split = two_class_split(at(1.0), tok)  # the expert fixes every image that zero-shot gets wrong
    fixed = margins(base, tok, split) < 0
    assert fixed.sum() >= 8
    alpha = crossing(base, at(1.0), tok, split)["path_alpha"]
    assert 0 < alpha < 1
    # two classes: the margin is linear along the tangent path, so at the median crossing half the fixed turn right
    right_below, right_above = ((margins(at(a), tok, split)[fixed] > 0).mean() for a in (0.98 * alpha, 1.02 * alpha))
    assert right_below <= 0.5 <= right_above


def test_tangent_evaluation_needs_linearized_experts():
    r = subprocess.run([sys.executable, str(BENCH / "mergeability_diagnosis.py"), "--tangent"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs --set train.mode=linear" in r.stderr


def test_pair_costs_charge_an_anti_expert_all_of_the_gain_and_a_null_expert_nothing():
    from mergeability_diagnosis import pair_costs

    from chronomerge.evaluate import score
    from chronomerge.merge import merge

    base, theta0, tau = random_base_and_visual_tau(0.3)
    states = [{n: theta0[n] + tau[n] for n in theta0}, {n: theta0[n] - tau[n] for n in theta0}, theta0]

    def averaged(experts: list[int]) -> torch.nn.Module:  # θ0 + Σ τ_e / 3
        return loaded(merge("task_arithmetic", theta0, [states[e] for e in experts], scale=1 / 3))

    tok = get_tokenizer("chronoclip-tiny")
    split = two_class_split(averaged([0]), tok)  # expert 0's share alone gains on "its task"
    zs = score(base, tok, split, "cpu")

    def gain_at(i: int, experts: list[int]) -> float:
        return score(averaged(experts), tok, split, "cpu") - zs

    alone = gain_at(0, [0])
    assert alone > 0.1
    c = pair_costs(gain_at, 3)
    assert c[0, 1] == pytest.approx(alone)  # θ0 + (τ − τ)/3 is θ0: the anti-expert takes the whole gain
    assert c[0, 2] == 0  # a null task vector costs nothing
    assert (np.diag(c) == 0).all()
