"""Promotion of a continual update's candidate model: the gate and the record of decisions.

A candidate is promoted when, for every gated metric m, m(candidate) ≥ m(promoted) − tolerance
(the first candidate has nothing to compare with), and every floor is met: m(candidate) ≥ floor_m.
`.chronomerge/promotions.json` lists every decision in order:
the candidate, the model it was compared with, the metrics, promoted or not, and why.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from chronomerge.store import atomic_write_json

DECISIONS = Path(".chronomerge") / "promotions.json"
JOURNAL = Path(".chronomerge") / "update-journal.json"  # an update in progress (see flows/update.py)


def gate(candidate: Mapping[str, float], promoted: Mapping[str, float] | None, metrics: Sequence[str],
         tolerance: float, floor: Mapping[str, float] | None = None) -> tuple[bool, str]:
    """(passes, reason) for `candidate` against the promoted model's metrics and the floors.
    A gated metric that the stream does not measure (A_ZS and GM without held-out sets) refuses."""
    absent = sorted({m for m in [*metrics, *(floor or {})] if candidate.get(m) is None})
    if absent:
        return False, (f"gate refused: {', '.join(absent)} not measured (no evaluation sets of that kind; "
                       f"set eval.held_out, or gate on other metrics in update.gate.metrics)")
    failed = [f"{m} {100 * candidate[m]:.2f} < floor {100 * v:.2f}" for m, v in (floor or {}).items()
              if candidate[m] < v]
    if promoted is not None:
        failed += [f"{m} {100 * candidate[m]:.2f} < {100 * promoted[m]:.2f} - {100 * tolerance:.2f}"
                   for m in metrics if candidate[m] < promoted[m] - tolerance]
    if failed:
        return False, "gate refused: " + "; ".join(failed)
    if promoted is None:
        return True, "first model: nothing promoted yet" + (" (floors met)" if floor else "")
    return True, "gate passed: " + "; ".join(f"{m} {100 * candidate[m]:.2f} >= {100 * promoted[m]:.2f} - "
                                             f"{100 * tolerance:.2f}" for m in metrics)


def read_decisions(project: Path) -> list[dict]:
    path = Path(project) / DECISIONS
    return json.loads(path.read_text()) if path.exists() else []


def promoted(decisions: Sequence[Mapping]) -> Mapping | None:
    """The decision that promoted the model now deployed, or None."""
    return next((d for d in reversed(decisions) if d["promoted"]), None)


def record(project: Path, decision: Mapping) -> None:
    atomic_write_json(Path(project) / DECISIONS, [*read_decisions(project), dict(decision)])


def read_journal(project: Path) -> dict | None:
    path = Path(project) / JOURNAL
    return json.loads(path.read_text()) if path.exists() else None


def write_journal(project: Path, journal: Mapping) -> None:
    atomic_write_json(Path(project) / JOURNAL, dict(journal))


def clear_journal(project: Path) -> None:
    (Path(project) / JOURNAL).unlink(missing_ok=True)
