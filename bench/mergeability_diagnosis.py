"""Why does averaging keep so little of the experts' gain? One seed, one fine-tuning recipe.

    python bench/mergeability_diagnosis.py --seed 0 [--tasks 8] [--set train.mode=vision ...] [--device cuda]
        [--multitask] [--probe] [--out bench/results-mergeability-diagnosis.jsonl]
        [--width W] [--layers L] [--n-train N] [--pool N] [--tail-share S] [--pretrain-logit-scale S]
        [--train NAME,...]  (levers: bench/levers.py)  [--tangent] [--pairs]

For the first K tasks of the default stream (the base and data of `bench/benchmark_properties.py`,
same --data and --store) it trains one expert per task from θ0 and reports, in points (0-100):

  gain_mean, gain_min    each expert's own-task score minus the base's
  a_zs_drop_mean         the base's A_ZS minus one expert's, mean over the K experts
  keep_avg, keep_ta      averaging the K experts / task arithmetic (λ 0.3): share of their mean gain kept
  keep_alone             each expert alone at θ0 + τ/K, where averaging puts it: the share kept without
                         any interference from the others (averaging's ceiling; 1/K if gain grows
                         linearly along τ)
  keep_multitask         (--multitask) one model trained on the K tasks' data at once (K × the steps):
                         can the architecture hold the K tasks together?
  probe_base, probe_expert
                         (--probe) per task, a logistic-regression probe on the base's / the expert's image
                         features, against the expert's zero-shot score: are the features already there?
  crossing             per classification task, over the test images the expert fixes: the median
                         zero-shot deficit (best wrong class's cosine minus the true class's), the
                         median expert margin (the reverse), and the median α where mixing the two
                         models' cosines, (1 − α)·zero-shot + α·expert, turns right: small when experts
                         are far more confident than zero-shot is wrong (WiSE-FT's concave curves);
                         `path_alpha`, the same on the unnormalised image features: where the weight path
                         θ0 + α·τ turns right when the features are linear in α (exactly so under
                         --tangent; to first order otherwise). The argmax ignores the features' norm, so
                         an expert whose features are shorter than θ0's crosses later on the path than
                         its cosines suggest
  geometry             per task, over all its test images (medians): how far the expert turns the
                         image features (cosine between θ0's and the expert's unnormalised features,
                         and the ratio of their norms) and how far θ0 + τ/K's normalised features have
                         moved towards the expert's (projection onto f_expert − f_θ0, as a fraction:
                         1/K if the features were linear in the weights, 0.075 for K = 8 when a
                         90° turn is interpolated and renormalised), and the same for the unnormalised
                         features (`raw_moved_at_tau_over_k`: 1/K exactly when they are linear in the
                         weights, so a shortfall there is the network's curvature, not renormalisation)
  interference         (--pairs) where averaging loses what the experts keep alone. Per task i (points):
                         `alone` (θ0 + τ_i/K), `averaged` (the K-expert average) and `by_source`, what
                         adding one other expert's share costs it: gain at θ0 + τ_i/K minus gain at
                         θ0 + (τ_i + τ_j)/K (`pair_costs`; negative when expert j helps task i). Then
                         `cost_by_source`, each expert's cost to the others (mean over targets), and
                         `pair_cost_sum_mean` against `lost_mean` (alone − averaged, mean over tasks):
                         equal when the losses add up pair by pair
Every keep_* is a ratio of means (`benchmark_properties._share`).

--tangent (needs train.mode=linear) evaluates every model, experts and merges alike, as the linearized
model the experts were trained as, f(x; θ0) + J_θ f(x; θ0)·(θ − θ0) for the image tower (`Tangent`), instead
of as the open_clip model θ the pipeline deploys. There the image features are linear in the weights exactly
(`raw_moved_at_tau_over_k` is 1/K), so what averaging loses is the crossing and the interference alone, not
the network's curvature (tangent task arithmetic, Ortiz-Jiménez et al., NeurIPS 2023).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import levers  # noqa: E402
from benchmark_properties import _share, device_of, emit, probe  # noqa: E402

from chronomerge.benchmark import ensure_base, pretrain_recipe  # noqa: E402
from chronomerge.config import load_config  # noqa: E402
from chronomerge.data import catalog, load_split, prepare  # noqa: E402
from chronomerge.data.streams import build_stream, multitask, task_split  # noqa: E402
from chronomerge.evaluate import encode_images, evaluate, score, summarize, text_head  # noqa: E402
from chronomerge.merge import merge  # noqa: E402
from chronomerge.models import arch_of, get_tokenizer, load_model  # noqa: E402
from chronomerge.store import CheckpointStore  # noqa: E402
from chronomerge.train import Linearized, train  # noqa: E402


class Tangent(torch.nn.Module):
    """θ0's CLIP with its image tower evaluated in θ0's tangent space at the weights `state` (--tangent):
    image features f(x; θ0) + J_θ f(x; θ0)·(θ − θ0); the text tower and logit scale are θ0's (a linearized
    expert leaves them there). Evaluates like an open_clip model (`encode_image`, `encode_text`, `visual`)."""

    def __init__(self, base: torch.nn.Module, state: dict):
        super().__init__()
        self.clip = copy.deepcopy(base)
        self.visual = self.clip.visual
        self.lin = Linearized(self.clip)
        for name, tau in self.lin.tau.items():
            tau.data = state[name].to(tau.device) - self.lin.theta0[name.removeprefix("visual.")]

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.lin.encode_image(x, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(text, normalize=normalize)


def margins(model, tokenizer, split, normalize: bool = True) -> np.ndarray:
    """Per test image: the true class's cosine minus the best other class's (the model's own text head);
    with `normalize=False`, the same on the unnormalised image features (the same argmax, another scale)."""
    dev = device_of(model)
    head = text_head(model, tokenizer, split.classes, split.templates, dev)
    sims = (encode_images(model, split.images, dev, normalize=normalize) @ head).cpu().numpy()
    rows = np.arange(len(split.labels))
    true = sims[rows, split.labels].copy()
    sims[rows, split.labels] = -np.inf
    return true - sims.max(1)


def crossing(base, expert, tokenizer, split) -> dict | None:
    """Where the expert's gain comes from (see `crossing` in the module docstring)."""
    if split.kind != "classification":
        return None
    m0, m1 = margins(base, tokenizer, split), margins(expert, tokenizer, split)
    fixed = (m0 < 0) & (m1 > 0)
    if not fixed.any():
        return None
    r0, r1 = (margins(m, tokenizer, split, normalize=False)[fixed] for m in (base, expert))
    return {"fixed": int(fixed.sum()), "zs_deficit": round(float(np.median(-m0[fixed])), 4),
            "expert_margin": round(float(np.median(m1[fixed])), 4),
            "alpha": round(float(np.median(-m0[fixed] / (m1[fixed] - m0[fixed]))), 3),
            "path_alpha": round(float(np.median(-r0 / (r1 - r0))), 3)}


def geometry(base, expert, scaled, split) -> dict:
    """How far the expert turns the features, and how far θ0 + τ/K gets (see `geometry` above)."""
    with torch.no_grad():
        g0, g1, gk = (encode_images(m, split.images, device_of(m), normalize=False) for m in (base, expert, scaled))
    f0, f1, fk = (torch.nn.functional.normalize(g, dim=1) for g in (g0, g1, gk))

    def way(a, b, c):  # how far c has moved from a towards b, as a fraction of the way (per image)
        return ((c - a) * (b - a)).sum(1) / ((b - a) ** 2).sum(1).clamp_min(1e-12)

    return {"cos": round(float(torch.nn.functional.cosine_similarity(g0, g1).median()), 3),
            "norm_ratio": round(float((g1.norm(dim=1) / g0.norm(dim=1)).median()), 3),
            "moved_at_tau_over_k": round(float(way(f0, f1, fk).median()), 3),
            "raw_moved_at_tau_over_k": round(float(way(g0, g1, gk).median()), 3)}


def pair_costs(gain_at, k: int) -> np.ndarray:
    """c[i, j] = gain_at(i, [i]) − gain_at(i, [i, j]): what expert j's share of an average costs task i, where
    gain_at(i, experts) is task i's gain at θ0 + Σ_{e ∈ experts} τ_e / K. The diagonal is 0."""
    c = np.zeros((k, k))
    for i in range(k):
        alone = gain_at(i, [i])
        for j in range(k):
            if j != i:
                c[i, j] = alone - gain_at(i, [i, j])
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    p.add_argument("--tasks", type=int, default=8, help="K, the first K tasks of the default stream")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train.* or pretrain.* override")
    p.add_argument("--multitask", action="store_true", help="also train one model on the K tasks at once")
    p.add_argument("--probe", action="store_true", help="also fit linear probes on base and expert features")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to pretrain, fine-tune and evaluate (default: cuda when there is one)")
    p.add_argument("--out", help="append the JSON line to this file")
    p.add_argument("--tangent", action="store_true",
                   help="evaluate every model in θ0's tangent space, where linearized experts train")
    p.add_argument("--pairs", action="store_true",
                   help="also measure what each expert's share of the average costs each other task")
    levers.add_arguments(p, trainable=True)
    args = p.parse_args()
    record = levers.apply(p, args)
    fine_tune = levers.fine_tune(train, record.get("trainable"))
    config = load_config(None, args.set)
    if args.tangent and (config.train.mode != "linear" or record.get("trainable")):
        p.error("--tangent evaluates linearized experts: it needs --set train.mode=linear and no --train")
    t0 = time.perf_counter()
    prepare(args.data, args.seed)
    store = CheckpointStore(args.store)
    dev = args.device
    arch = levers.arch(args)
    base_id = ensure_base(store, args.data, args.seed, arch=arch, cfg=pretrain_recipe(config.pretrain), device=dev)
    base = load_model(store, base_id, arch).to(dev)
    tok = get_tokenizer(arch)
    cfg = config.train.model_copy(update={"seed": args.seed})
    k = args.tasks
    tasks = build_stream("dataset-incremental", k, args.seed)
    train_sets = [task_split(args.data, t, "train") for t in tasks]
    test_sets = [task_split(args.data, t, "test") for t in tasks]
    held_out = {d.name: load_split(args.data, d.name, "test") for d in catalog.EVALUATION}

    def a_zs(model) -> float:
        return summarize(evaluate(model, tok, held_out, dev), [], list(held_out))["A_ZS"]

    def gains_of(model) -> list[float]:
        return [score(model, tok, s, dev) - z for s, z in zip(test_sets, zs)]

    def loaded(state: dict):
        if args.tangent:
            return Tangent(base, state)
        m = copy.deepcopy(base)
        m.load_state_dict(state)
        return m

    def evaluated(trained):  # a trained model as it is evaluated: itself, or its weights in the tangent space
        return Tangent(base, trained.state_dict()) if args.tangent else trained

    zs, zs_a_zs, theta0 = [score(base, tok, s, dev) for s in test_sets], a_zs(base), base.state_dict()
    states, gains, alone, drops, probes, crossings, geometries = [], [], [], [], [], [], []
    for t in range(k):
        m = copy.deepcopy(base)
        fine_tune(m, train_sets[t], cfg, tokenizer=tok, device=dev)
        states.append({n: v.clone() for n, v in m.state_dict().items()})
        m = evaluated(m)
        own = score(m, tok, test_sets[t], dev)
        gains.append(own - zs[t])
        drops.append(zs_a_zs - a_zs(m))
        scaled = loaded(merge("task_arithmetic", theta0, [states[-1]], scale=1 / k))
        alone.append(score(scaled, tok, test_sets[t], dev) - zs[t])
        geometries.append(geometry(base, m, scaled, test_sets[t]))
        crossings.append(crossing(base, m, tok, test_sets[t]))
        if args.probe:
            probes.append({"task": tasks[t].name, "zero_shot": round(100 * zs[t], 1), "expert": round(100 * own, 1),
                           "probe_base": _pct(probe(base, train_sets[t], test_sets[t])),
                           "probe_expert": _pct(probe(m, train_sets[t], test_sets[t]))})
    averaged = gains_of(loaded(merge("average", theta0, states)))
    out = {"seed": args.seed, "base": base_id[:12], "model": arch_of(arch)["name"], **record, "tasks": k,
           "set": args.set, **({"evaluated": "tangent"} if args.tangent else {}),
           "base_logit_scale": round(math.exp(float(theta0["logit_scale"])), 2),
           "gain_mean": 100 * sum(gains) / k, "gain_min": 100 * min(gains), "a_zs_drop_mean": 100 * sum(drops) / k,
           "keep_avg": _share(averaged, gains),
           "keep_ta": _share(gains_of(loaded(merge("task_arithmetic", theta0, states, scale=0.3))), gains),
           "keep_alone": _share(alone, gains)}
    if args.multitask:
        m = copy.deepcopy(base)
        fine_tune(m, task_split(args.data, multitask(tasks), "train"), cfg.model_copy(update={"steps": k * cfg.steps}),
                  tokenizer=tok, device=dev)
        out["keep_multitask"] = _share(gains_of(evaluated(m)), gains)
    if args.pairs:
        def gain_at(i: int, experts: list[int]) -> float:
            merged = merge("task_arithmetic", theta0, [states[e] for e in experts], scale=1 / k)
            return score(loaded(merged), tok, test_sets[i], dev) - zs[i]

        cost = 100 * pair_costs(gain_at, k)
        names = [t.name for t in tasks]
        out["interference"] = {names[i]: {"alone": round(100 * alone[i], 1), "averaged": round(100 * averaged[i], 1),
                                          "by_source": {names[j]: round(cost[i, j], 1) for j in range(k) if j != i}}
                               for i in range(k)}
        out["cost_by_source"] = {names[j]: round(float(np.delete(cost[:, j], j).mean()), 1) for j in range(k)}
        out["pair_cost_sum_mean"] = round(float(cost.sum(1).mean()), 1)
        out["lost_mean"] = round(100 * float(np.mean(alone) - np.mean(averaged)), 1)
    crossed = [c for c in crossings if c is not None]
    out["crossing_alpha_median"] = float(np.median([c["alpha"] for c in crossed])) if crossed else None
    out["path_alpha_median"] = float(np.median([c["path_alpha"] for c in crossed])) if crossed else None
    out["crossings"] = {tasks[t].name: c for t, c in enumerate(crossings) if c is not None}
    out["moved_at_tau_over_k_median"] = float(np.median([g["moved_at_tau_over_k"] for g in geometries]))
    out["raw_moved_at_tau_over_k_median"] = float(np.median([g["raw_moved_at_tau_over_k"] for g in geometries]))
    out["feature_cos_median"] = float(np.median([g["cos"] for g in geometries]))
    out["geometry"] = {tasks[t].name: g for t, g in enumerate(geometries)}
    if probes:
        out["probes"] = probes
    out["gains"] = [round(100 * g, 1) for g in gains]
    out["seconds"] = time.perf_counter() - t0
    emit(out, args.out)


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 1)


if __name__ == "__main__":
    main()
