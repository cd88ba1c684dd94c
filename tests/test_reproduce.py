"""`chronomerge report --reproduce` on a 2-task tiny stream, one seed (CI time): every finding is
computed from the runs (the real report uses 3 seeds; the code path is the same)."""
import json

import pytest

from flows.cli import main
from flows.sweep import point_name


@pytest.mark.slow
def test_reproduce_runs_every_experiment_and_judges_each_finding_from_the_figures(project, capsys):
    sets = ["stream.length=2", "train.steps=5"]
    assert main(["report", "--reproduce", "--seeds", "0", "--opcm-lengths", "2", "3",
                 *[x for s in sets for x in ("--set", s)]]) == 0
    report = (project / "outputs" / "reproduce" / "reproduction.md").read_text()
    data = json.loads((project / "outputs" / "reproduce" / "reproduction.json").read_text())
    claims = [f["claim"] for f in data["findings"]]
    assert all(c in report for c in claims) and all(f["holds"] is not None for f in data["findings"])
    assert sum(c.startswith("TIME") for c in claims) == 3 and sum(c.startswith("CMM") for c in claims) == 3
    assert sorted(c for c in claims if c.startswith("OPCM")) == sorted(
        f"OPCM: OPCM beats continual task arithmetic and TIES in {m} at T = {t} (vision-only experts from θ0)"
        for m in ("ACC", "BWT") for t in (2, 3))
    res = data["results"]
    assert len(res["pairs"]) == 12 and len(res["techniques"]) == 9 and len(res["cmm"]) == 8
    # The Best-in-TIME verdict follows from the pair means.
    means = {}
    for r in res["pairs"]:
        key = r["point"].split(",stream.seed")[0]
        means.setdefault(key, []).append(r["GM"])
    best = max(means, key=lambda k: sum(means[k]) / len(means[k]))
    by_claim = {f["claim"]: f for f in data["findings"]}
    verdict = by_claim["TIME: Best-in-TIME (init ema, deploy ema) has the best GM of the init/deploy pairs"]
    assert verdict["holds"] == (best == "init.mode=ema,deploy.mode=ema")
    # OPCM setting: one run per method at the longest T, ACC at T = 2 read from its accuracy matrix.
    opcm = res["opcm-opcm-released-code"][0]["matrix"]
    assert len(opcm) == 3 and len(res["opcm-continual-ta-0-3"][0]["matrix"]) == 3
    acc2 = (opcm[1][0] + opcm[1][1]) / 2
    assert data["tables"]["opcm"]["OPCM (released code)"]["2"]["ACC"]["mean"] == pytest.approx(acc2)
    individual = res["opcm-individual-experts"][0]["matrix"]
    norm = (opcm[1][0] / individual[0][0] + opcm[1][1] / individual[1][1]) / 2
    assert data["tables"]["opcm"]["OPCM (released code)"]["2"]["norm"]["mean"] == pytest.approx(norm)
    # Bounds rows on every table
    for table in ("time", "opcm", "cmm"):
        assert {"zero-shot", "individual experts", "multitask"} <= set(data["tables"][table])
    assert "| individual experts | " in report and "| zero-shot | " in report and "| multitask | " in report
    assert "stream.length=2" in report and "Wall time:" in report


def _rows(points, seeds=(0, 1), value=lambda p, s: 0.1):
    """Sweep results of the grid values `points` over `seeds`, as sweep_flow reports them."""
    return [{"point": point_name({**p, "stream.seed": s}), "values": {**p, "stream.seed": s},
             "GM": value(p, s), "ACC": value(p, s), "BWT": -value(p, s)} for p in points for s in seeds]


def test_runs_that_did_not_finish_are_reported_not_scored():
    from flows.reproduce import findings

    pairs = [{"strategy.init.mode": i, "strategy.deploy.mode": d} for i in ("zs", "ft", "ema", "all")
             for d in ("ft", "ema", "all")]
    gm = {"average": 0.30, "ties": 0.34}
    res = {
        "pairs": _rows(pairs, value=lambda p, s: 0.1 + 0.01 * pairs.index(p)),
        "replay": _rows([{}]), "offline": _rows([{"strategy.deploy.recency": "uniform"}]),
        "techniques": _rows([{"strategy.init.technique": t} for t in gm],
                            value=lambda p, s: gm[p["strategy.init.technique"]]),
        "cmm": [],
        "failed": [{**r, "experiment": "techniques", "error": "NonFiniteError: ..."}
                   for r in _rows([{"strategy.init.technique": "dare_ties"}])],
    }
    found = findings(res)
    spread = next(f for f in found if "matters less" in f["claim"])
    assert "spread across techniques 4.0" in spread["figures"] and "across pairs 11.0" in spread["figures"]
    assert spread["holds"] is True and "dare_ties did not finish on 2/2 seeds" in spread["figures"]
    (cmm,) = [f for f in found if f["claim"] == "CMM's findings"]
    assert cmm["holds"] is None and cmm["figures"].startswith("not judged")


def test_bounds_use_each_seeds_own_task_order():
    from flows.reproduce import time_table

    orders = {0: ["a", "b"], 1: ["c", "d"]}
    zs = {0: {"a": 0.1, "b": 0.3, "c": 0.9, "d": 0.9, "h": 0.5}, 1: {"a": 0.9, "b": 0.9, "c": 0.2, "d": 0.4, "h": 0.7}}

    def row(values, seed, matrix, **m):
        values = {**values, "stream.seed": seed}
        return {"point": point_name(values), "values": values, "matrix": matrix, "order": orders[seed],
                "scores": {}, **{"A_KA": 0.5, "A_ZS": 0.5, "GM": 0.5, **m}}

    pair = {"strategy.init.mode": "zs", "strategy.deploy.mode": "ft"}
    res = {"pairs": [row(pair, s, [[0.4], [0.3, 0.8]]) for s in (0, 1)],
           "offline": [], "replay": [], "multitask": []}
    table = time_table(res, zs, ["h"], 2)
    assert table["zero-shot"]["A_KA"]["by_seed"] == {0: pytest.approx(0.2), 1: pytest.approx(0.3)}
    assert table["zero-shot"]["norm"]["by_seed"][0] == pytest.approx((0.1 / 0.4 + 0.3 / 0.8) / 2)
    assert table["individual experts"]["A_KA"]["mean"] == pytest.approx(0.6)
    pair = table["init zs, deploy ft"]
    assert pair["norm"]["mean"] == pytest.approx((0.3 / 0.4 + 1.0) / 2)
