"""A stream's results on disk: metrics JSON, per-step history, curves CSV, plots and a report.

`history` is the dict the stream flow builds: one entry per step t with A_KA, A_ZS, GM, ACC, BWT,
per-dataset scores, row t of the accuracy matrix, checkpoint ids and stage timings; and `zero_shot`,
θ0 scored on the same sets (A_KA, A_ZS, GM, and ACC over the stream's tasks), the reference a
continual method must beat.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chronomerge.store import atomic_write_bytes

SUMMARY = ("A_KA", "A_ZS", "GM")  # a model's scores (docs/methods.md, "Metrics")
ZERO_SHOT = (*SUMMARY, "ACC")  # the zero-shot reference θ0's scores (no BWT: θ0 never changes)
METRICS = SUMMARY + ("ACC", "BWT")  # and the stream's, after each step


def matrix(history: Mapping[str, Any]) -> np.ndarray:
    """The accuracy matrix R[t, i] (NaN above the diagonal: tasks not seen yet)."""
    rows = [s["row"] for s in history["steps"]]
    r = np.full((len(rows), len(rows)), np.nan)
    for t, row in enumerate(rows):
        r[t, :len(row)] = [np.nan if x is None else x for x in row]
    return r


def final_metrics(history: Mapping[str, Any]) -> dict[str, float]:
    """The last step's scores (fractions), numbers only, as `dvc metrics` reads them (an absent one is left out)."""
    last = history["steps"][-1]
    return {k: round(last[k], 6) for k in METRICS if last[k] is not None}


def write_results(history: Mapping[str, Any], outputs: str | Path, metrics_path: str | Path) -> list[Path]:
    """metrics JSON (final figures), history.json and curves.csv; returns the paths."""
    out = Path(outputs)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(metrics_path, json.dumps(final_metrics(history), indent=1).encode())
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["t", "task", *METRICS])
    for s in history["steps"]:
        w.writerow([s["t"], s["task"], *("" if s[k] is None else f"{s[k]:.6f}" for k in METRICS)])
    atomic_write_bytes(out / "curves.csv", buf.getvalue().encode())
    return [metrics_path, out / "history.json", out / "curves.csv"]


def task_vector_cosines(store, base: str, experts: Sequence[str]) -> list[list[float]]:
    """Cosine similarity of the experts' task vectors τ_i = θ_i − θ0 over all floating parameters.

    Streams one parameter at a time (memory: T copies of the largest tensor): G += A·Aᵀ with
    A the T × n stack of that parameter's task vectors.
    """
    import torch

    b = store.get(base)
    models = [store.get(e) for e in experts]
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for key in b:
        if not b[key].dtype.is_floating_point:
            continue
        b0 = b[key].double().reshape(-1)
        a = torch.stack([m[key].double().reshape(-1) - b0 for m in models])
        gram += a @ a.T
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    return (gram / norms[:, None] / norms[None, :]).tolist()


def write_report(history: Mapping[str, Any], outputs: str | Path) -> list[Path]:
    """plots/metrics.png, plots/accuracy_matrix.png and report.md; returns the paths."""
    out = Path(outputs)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    paths = plot(history, out / "plots")
    atomic_write_bytes(out / "report.md", markdown(history).encode())
    return [*paths, out / "report.md"]


def plot(history: Mapping[str, Any], folder: Path) -> list[Path]:
    """A_KA, A_ZS and GM over tasks (TIME's figure style) and the accuracy-matrix heat map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = history["steps"]
    ts = [s["t"] for s in steps]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    absent = []
    for k in SUMMARY:
        if any(s[k] is not None for s in steps):
            ax.plot(ts, [np.nan if s[k] is None else 100 * s[k] for s in steps], marker="o", ms=3, label=k)
        else:  # no evaluation sets of that kind: no line, not zeros
            absent.append(k)
    if absent:
        ax.text(0.01, 0.02, f"{', '.join(absent)} absent (no held-out sets)", transform=ax.transAxes, fontsize=8,
                color="0.4")
    z = history.get("zero_shot")
    if z is not None and z["GM"] is not None:
        ax.axhline(100 * z["GM"], color="C2", ls="--", lw=1, label="GM, zero-shot θ0")
    ax.set_ylabel("score (%)")
    ax.set_title("A_KA, A_ZS and GM after each task", fontsize=10)
    for k in ("ACC", "BWT"):
        ax2.plot(ts, [np.nan if s[k] is None else 100 * s[k] for s in steps], marker="o", ms=3, label=k)
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set_ylabel("points")
    ax2.set_title("ACC and BWT over the tasks seen", fontsize=10)
    for a in (ax, ax2):
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.set_xlabel("task t (1-based)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="best")
    fig.suptitle(history.get("title", "stream"), fontsize=11)
    fig.tight_layout()
    curves = folder / "metrics.png"
    _save(fig, curves)
    r = matrix(history)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    seen = 100 * r[np.isfinite(r)]
    im = ax.imshow(100 * r, vmin=float(seen.min()) if seen.size else 0, vmax=float(seen.max()) if seen.size else 100,
                   cmap="viridis")
    ax.set_xlabel("task i (1-based)")
    ax.set_ylabel("after step t (1-based)")
    _task_ticks(ax, len(ts))
    if len(ts) <= 12:  # few enough cells to read their values
        for (t, i), v in np.ndenumerate(100 * r):
            if np.isfinite(v):
                ax.text(i, t, f"{v:.0f}", ha="center", va="center", fontsize=8, color="w" if v < seen.mean() else "k")
    fig.colorbar(im, ax=ax, label="score on task i (%)")
    ax.set_title("accuracy matrix R[t, i]")
    fig.tight_layout()
    heat = folder / "accuracy_matrix.png"
    _save(fig, heat)
    out = [curves, heat]
    lams = [s.get("lambda") for s in steps]
    if any(v is not None for v in lams):  # OPCM: adaptive λ(t) against √t (OPCM, Eq. 7 and Thm 5.2)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ts, lams, marker="o", ms=3, label="λ(t)")
        ax.plot(ts, [math.sqrt(t) for t in ts], ls="--", label="√t")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("task t (1-based)")
        ax.set_ylabel("scaling λ")
        ax.set_title("OPCM's adaptive λ(t) against √t")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(folder / "opcm_lambda.png")
        _save(fig, out[-1])
    if history.get("task_vector_cosine"):
        cos = np.asarray(history["task_vector_cosine"])
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        off = np.abs(cos[~np.eye(len(cos), dtype=bool)])
        lim = float(off.max()) if off.size and off.max() > 0 else 1.0  # a scale that fits the pairs, not the diagonal
        im = ax.imshow(cos, vmin=-lim, vmax=lim, cmap="coolwarm")
        fig.colorbar(im, ax=ax, label="cos(τ_i, τ_j) (diagonal 1, off the scale)")
        ax.set_title("task-vector cosine similarity")
        ax.set_xlabel("task j (1-based)")
        ax.set_ylabel("task i (1-based)")
        _task_ticks(ax, len(cos))
        fig.tight_layout()
        out.append(folder / "task_vector_cosine.png")
        _save(fig, out[-1])
    plt.close("all")
    return out


def _task_ticks(ax, n: int) -> None:
    """1-based task labels on both axes of an n × n heatmap, at most about ten of them, readable."""
    every = max(1, math.ceil(n / 10))
    pos = list(range(0, n, every))
    ax.set_xticks(pos, [str(i + 1) for i in pos], fontsize=9)
    ax.set_yticks(pos, [str(i + 1) for i in pos], fontsize=9)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def markdown(history: Mapping[str, Any]) -> str:
    steps = history["steps"]
    lines = [f"# {history.get('title', 'stream')}", "",
             f"Deployed after task {len(steps)}: `{steps[-1]['checkpoints']['deployed']}`", "",
             *_against_zero_shot(history),
             "| t | task | A_KA | A_ZS | GM | ACC | BWT | train s | eval s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        sec = s["seconds"]
        lines.append(f"| {s['t']} | {s['task']} | " + " | ".join(pct(s[k]) for k in METRICS)
                     + f" | {sec.get('train', 0):.1f} | {sec.get('eval', 0):.1f} |")
    lines += ["", "Scores in %. A_KA: mean over adaptation datasets; A_ZS: over held-out datasets; "
              "GM = sqrt(A_KA·A_ZS); ACC and BWT from the accuracy matrix (rows up to t); – : absent "
              "(no datasets of that kind).", ""]
    return "\n".join(lines)


def _against_zero_shot(history: Mapping[str, Any]) -> list[str]:
    """The report's line comparing the last deployed model with θ0 (histories before it lack `zero_shot`)."""
    z, last = history.get("zero_shot"), history["steps"][-1]
    if z is None:
        return []
    gap = "" if last["GM"] is None else f" The deployed model's GM is {versus(last['GM'], z['GM'])}."
    return [f"Zero-shot θ0 on the same sets: {scores_line(z, ZERO_SHOT)}.{gap}", ""]


def versus(score: float, reference: float, digits: int = 1) -> str:
    """`3.8 points below zero-shot's`: a score against the zero-shot reference, in points."""
    d = 100 * (score - reference)
    return f"{abs(d):.{digits}f} points {'above' if d >= 0 else 'below'} zero-shot's"


def scores_line(d: Mapping[str, Any], keys: Sequence[str] = METRICS, digits: int = 1) -> str:
    """`A_KA 25.7%  A_ZS –  …`: scores in percent, '–' where absent."""
    return "  ".join(f"{k} {pct(d.get(k), digits)}{'' if d.get(k) is None else '%'}" for k in keys)


def pct(x: float | None, digits: int = 1) -> str:
    """A score in %, '–' when absent."""
    return "–" if x is None else "nan" if math.isnan(x) else f"{100 * x:.{digits}f}"
