"""Is the embedded benchmark in CLIP's regime? Measures the properties it must have, for one seed.

    python bench/benchmark_properties.py --seed 0 [--parts zs,experts,merge,headroom,seq,streams] [--device cuda]
        [--set train.KEY=V] [--set pretrain.KEY=V]
        [--width W] [--layers L] [--pool N] [--tail-share S] [--n-train N] [--pretrain-logit-scale S]
        (levers: bench/levers.py)

The seed fixes the data, the base model's pretraining and the task order's training noise. Prints
one JSON line (accuracy points, 0-100) and, with --out, appends it to a JSON-lines file:

  chance, zs_a_zs, zs_a_ka  zero-shot base on the held-out / adaptation sets   (A_ZS >= 2 x chance)
  gain_min, gain_mean       experts trained from θ0 (default recipe): own-task score - base's
                                                                  (min >= 15, mean >= 25)
  a_zs_drop_mean            base A_ZS - one expert's A_ZS, mean over the tasks       (<= 10)
  keep_avg_clip             averaging the first 8 whole-CLIP experts: the merged model's gain over
                            zero-shot on their tasks / their mean gain               (>= 35%)
  keep_avg_vision           the same for vision-only experts (frozen zero-shot text head)
  keep_ta_clip              (reported) task arithmetic, λ = 0.3, of the same 8 whole-CLIP experts
  keep_alone_clip           (reported) each of those experts alone at θ0 + τ/8: the share of their mean gain
                            they keep, averaging's ceiling without interference (1/8 = 12.5% if linear)
  Every keep_* is a ratio of means, and null when the experts gain under 1 point on average.
  headroom                  (reported; part headroom) per task: zero-shot, the whole-CLIP expert (with part
                            experts), a vision-only expert of the same recipe and a linear probe on θ0's
                            image features: which tasks leave no room for 15 points, which the recipe misses
  seq_bwt                   BWT of plain sequential fine-tuning over the stream       (<= -5)
  gm_zs, gm_best_in_time, gm_offline, gm_replay
                            GM at T = 20 of the pipeline's default stream (Best-in-TIME), offline
                            merging (init zs, deploy all) and continual fine-tuning with replay
                                                                  (each >= zero-shot + 5)
  a_ka_*, a_zs_*            (reported) the A_KA and A_ZS each of those GMs is made of
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import levers  # noqa: E402

from chronomerge.benchmark import ensure_base, pretrain_recipe  # noqa: E402
from chronomerge.config import apply_overrides, load_config, validate  # noqa: E402
from chronomerge.data import catalog, load_split, prepare  # noqa: E402
from chronomerge.data.streams import build_stream, task_split  # noqa: E402
from chronomerge.evaluate import chance, encode_images, evaluate, score, summarize  # noqa: E402
from chronomerge.merge import merge  # noqa: E402
from chronomerge.models import arch_of, get_tokenizer, load_model  # noqa: E402
from chronomerge.store import CheckpointStore  # noqa: E402
from chronomerge.train import train  # noqa: E402

PARTS = ("zs", "experts", "merge", "headroom", "seq", "streams")
PROPERTIES = ("zs", "experts", "merge", "seq", "streams")  # the default: every part but the headroom diagnosis
MERGED = 8  # mergeability is measured on the first 8 experts, like the papers' 8-task setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--parts", default=",".join(PROPERTIES),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: {','.join(PROPERTIES)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train.* or pretrain.* override of the default recipe, as `chronomerge run --set`")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to pretrain, fine-tune and evaluate (default: cuda when there is one)")
    p.add_argument("--out", help="append the JSON line to this file")
    levers.add_arguments(p)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    record = levers.apply(p, args)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        p.error(f"--parts: unknown {sorted(parts - set(PARTS))}; expected a subset of {list(PARTS)}")
    if "streams" in parts and (args.width, args.layers) != (None, None):
        p.error("--parts streams runs the pipeline's own model: it does not take --width or --layers")
    config = load_config(None, args.set)  # the default recipe and the --set overrides
    raw, dev = config.to_dict(), args.device
    t0 = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.verbose else (lambda *a: None)
    prepare(args.data, args.seed)
    store = CheckpointStore(args.store)
    arch = levers.arch(args)
    base_id = ensure_base(store, args.data, args.seed, arch=arch, cfg=pretrain_recipe(config.pretrain),
                          device=dev)
    log(f"base {base_id[:12]} ready after {time.perf_counter() - t0:.0f} s")
    base = load_model(store, base_id, arch).to(dev)
    tok = get_tokenizer(arch)
    held_out = {d.name: load_split(args.data, d.name, "test") for d in catalog.EVALUATION}
    tasks = build_stream("dataset-incremental", args.tasks, args.seed)
    train_sets = [task_split(args.data, t, "train") for t in tasks]
    test_sets = [task_split(args.data, t, "test") for t in tasks]
    adaptation = {t.name: s for t, s in zip(tasks, test_sets)}
    zs_scores = evaluate(base, tok, {**held_out, **adaptation}, dev)
    zs = summarize(zs_scores, list(adaptation), list(held_out))
    out = {"seed": args.seed, "base": base_id[:12], "model": arch_of(arch)["name"], **record, "recipe": raw["train"],
           "pretrain": raw["pretrain"],
           "chance": 100 * chance(held_out), "zs_a_zs": 100 * zs["A_ZS"], "zs_a_ka": 100 * zs["A_KA"]}
    log(f"zero-shot: {zs}")
    cfg = config.train.model_copy(update={"seed": args.seed})

    def expert(t: int, mode: str) -> torch.nn.Module:
        """An expert for task t trained from θ0 (mode vision: against θ0's zero-shot head)."""
        m = copy.deepcopy(base)
        train(m, train_sets[t], cfg.model_copy(update={"mode": mode}), tokenizer=tok, device=dev)
        return m

    def own_scores(model, n: int) -> list[float]:
        return [score(model, tok, test_sets[t], dev) for t in range(n)]

    def a_zs(model) -> float:
        return summarize(evaluate(model, tok, held_out, dev), [], list(held_out))["A_ZS"]

    zs_own = [zs_scores[t.name] for t in tasks]
    if "experts" in parts or "merge" in parts:
        n = len(tasks) if "experts" in parts else min(MERGED, len(tasks))
        gains, drops, clip_states = [], [], []
        for t in range(n):
            m = expert(t, "clip")
            gains.append(score(m, tok, test_sets[t], dev) - zs_own[t])
            if "experts" in parts:
                drops.append(zs["A_ZS"] - a_zs(m))
            if t < MERGED:
                clip_states.append({k: v.clone() for k, v in m.state_dict().items()})
            log(
                f"expert {tasks[t].name}: gain {100 * gains[-1]:.1f}"
                + (f", A_ZS drop {100 * drops[-1]:.1f}" if drops else "")
            )
        if "experts" in parts:
            out.update(gain_min=100 * min(gains), gain_mean=100 * sum(gains) / n, a_zs_drop_mean=100 * sum(drops) / n,
                       gains=[round(100 * g, 1) for g in gains])
        if "merge" in parts:
            k = len(clip_states)
            theta0 = base.state_dict()
            out["keep_avg_clip"] = _keep(base, merge("average", theta0, clip_states), own_scores, zs_own, gains[:k], k)
            out["keep_ta_clip"] = _keep(base, merge("task_arithmetic", theta0, clip_states, scale=0.3),
                                        own_scores, zs_own, gains[:k], k)
            # Averaging's ceiling without interference: each expert alone scaled to θ0 + τ/K keeps this
            # share of its own gain (about 1/K when accuracy grows linearly along τ, more when it saturates).
            alone = []
            for t, st in enumerate(clip_states):
                m = copy.deepcopy(base)
                m.load_state_dict(merge("task_arithmetic", theta0, [st], scale=1 / k))
                alone.append(score(m, tok, test_sets[t], dev) - zs_own[t])
            out["keep_alone_clip"] = _share(alone, gains[:k])
            log(f"whole-CLIP merges: {({key: out[key] for key in out if key.endswith('_clip')})}")
            vision_states, vgains = [], []
            for t in range(k):
                m = expert(t, "vision")
                vgains.append(score(m, tok, test_sets[t], dev) - zs_own[t])
                vision_states.append({kk: v.clone() for kk, v in m.state_dict().items()})
            out["vision_gain_mean"] = 100 * sum(vgains) / k
            out["keep_avg_vision"] = _keep(base, merge("average", theta0, vision_states), own_scores, zs_own, vgains, k)
            log(f"mergeability: {({key: out[key] for key in out if key.startswith(('keep', 'vision'))})}")
    if "headroom" in parts:
        # Where the gain minimum is lost, task by task: zero-shot (a task it nearly solves leaves an expert no
        # room for 15 points), the whole-CLIP expert (with --parts experts), a vision-only expert of the same
        # recipe (cross-entropy on the zero-shot head: the task's own objective, not its captions') and a
        # logistic-regression probe on θ0's image features (classification tasks).
        rows = []
        for t in range(len(tasks)):
            row = {"task": tasks[t].name, "zero_shot": round(100 * zs_own[t], 1)}
            if "experts" in parts:
                row["clip_expert"] = round(100 * (zs_own[t] + gains[t]), 1)
            row["vision_expert"] = round(100 * score(expert(t, "vision"), tok, test_sets[t], dev), 1)
            p_acc = probe(base, train_sets[t], test_sets[t])
            row["probe"] = None if p_acc is None else round(100 * p_acc, 1)
            rows.append(row)
            log(f"headroom {row}")
        out["headroom"] = rows
    if "seq" in parts:
        seq = copy.deepcopy(base)
        diag = []
        for t in range(len(tasks)):
            train(seq, train_sets[t], cfg, tokenizer=tok, device=dev)
            diag.append(score(seq, tok, test_sets[t], dev))
        final = own_scores(seq, len(tasks))
        out["seq_bwt"] = 100 * sum(final[i] - diag[i] for i in range(len(tasks) - 1)) / max(1, len(tasks) - 1)
        log(f"sequential fine-tuning: BWT {out['seq_bwt']:.1f}")
    if "streams" in parts:
        out["gm_zs"] = 100 * zs["GM"]
        out.update(_streams(args, raw, log))
    out["seconds"] = time.perf_counter() - t0
    emit(out, args.out)


def emit(out: dict, path: str | None) -> None:
    """Print the result as one JSON line (floats to 2 decimals) and append it to `path` if given."""
    line = json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()})
    print(line)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def probe(model, train_split, test_split) -> float | None:
    """Test accuracy of a logistic regression on the model's normalised image features (classification sets)."""
    from sklearn.linear_model import LogisticRegression

    if train_split.kind != "classification":
        return None
    features = encode_images(model, train_split.images, device_of(model)).cpu().numpy()
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(features, train_split.labels)
    test = encode_images(model, test_split.images, device_of(model)).cpu().numpy()
    return float(clf.score(test, test_split.labels))


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def _keep(base, merged: dict, own_scores, zs_own: list[float], gains: list[float], k: int) -> float | None:
    """Percentage of the experts' mean gain over zero-shot that the merged model keeps on their tasks."""
    m = copy.deepcopy(base)
    m.load_state_dict(merged)
    return _share([s - z for s, z in zip(own_scores(m, k), zs_own[:k])], gains)


def _share(kept: list[float], gains: list[float]) -> float | None:
    """100 × mean kept gain / mean expert gain; None (undefined) when the experts gain under 1 point on
    average, where the ratio would be noise (a smoke run of a few steps)."""
    mean_gain = sum(gains) / len(gains)
    return 100 * (sum(kept) / len(kept)) / mean_gain if mean_gain >= 0.01 else None


def _streams(args, raw: dict, log) -> dict[str, float]:
    """GM at the end of the default stream for Best-in-TIME, offline merging and replay, through the
    pipeline itself (Prefect flow, cached stages; tracking off), in a scratch project."""
    from flows.stream import stream_flow

    points = {"gm_best_in_time": [], "gm_offline": ["strategy.init.mode=zs", "strategy.deploy.mode=all"],
              "gm_replay": ["strategy.init.mode=ft", "strategy.deploy.mode=ft", "train.replay_pretrain=0.25",
                            "train.replay_previous=0.25"]}
    out = {}
    with tempfile.TemporaryDirectory() as project:
        for key, sets in points.items():
            cfg = apply_overrides(raw, [f"data.seed={args.seed}", f"train.seed={args.seed}",
                                        f"stream.length={args.tasks}", "tracking.enabled=false",
                                        f"data.root={Path(args.data).resolve()}",
                                        f"paths.store={Path(args.store).resolve()}", f"device={args.device}", *sets])
            final = stream_flow(validate(cfg), project=project, quiet=True)["final"]
            out[key] = 100 * final["GM"]
            # what the GM is made of: known tasks gained (A_KA) against zero-shot accuracy kept (A_ZS)
            for metric in ("A_KA", "A_ZS"):
                out[key.replace("gm", metric.lower())] = 100 * final[metric]
            log(f"{key}: {out[key]:.1f} (A_KA {100 * final['A_KA']:.1f}, A_ZS {100 * final['A_ZS']:.1f})")
    return out


if __name__ == "__main__":
    main()
