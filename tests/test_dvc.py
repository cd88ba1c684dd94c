"""DVC: `dvc repro` runs prepare → pretrain → stream → report and reruns only what a change touches."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_PARAMS

REPO = Path(__file__).resolve().parents[1]


def sh(cwd: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
def test_dvc_repro_reruns_only_changed_stages(tmp_path, seeded_project, prefect_api):
    proj = tmp_path / "proj"
    proj.mkdir()
    for d in ("chronomerge", "tasks", "flows"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / f, proj / f)
    shutil.copytree(seeded_project / "store", proj / "store")  # the tiny base, already pretrained
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(proj),
           "PREFECT_HOME": str(proj / ".prefect"),
           "PREFECT_API_URL": prefect_api, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(proj, env, "git", "init", "-q")
    sh(proj, env, "dvc", "init", "-q")
    sh(proj, env, "dvc", "config", "core.check_update", "false")
    sh(proj, env, "git", "add", "-A")
    sh(proj, env, "git", "commit", "-qm", "project")

    log = sh(proj, env, "dvc", "repro")
    assert ran(log) == ["prepare", "pretrain", "stream", "report"]
    assert "Warning" not in log and "Traceback" not in log, log  # what a DVC user reads: the stages' own lines
    first = json.loads((proj / "outputs" / "metrics.json").read_text())
    assert ran(sh(proj, env, "dvc", "repro")) == []
    # what a DVC user commits after a run: dvc.lock, the metrics and the curves (data and store stay out of git)
    sh(proj, env, "git", "add", "-A")
    sh(proj, env, "git", "commit", "-qm", "default run")
    tracked = sh(proj, env, "git", "ls-files").split()
    assert {"dvc.lock", "outputs/metrics.json", "outputs/curves.csv"} <= set(tracked)
    assert not any(f.startswith(("store/", "data/")) for f in tracked)

    params["strategy"]["deploy"]["mode"] = "all"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(proj, env, "dvc", "repro")) == ["stream", "report"]
    history = json.loads((proj / "outputs" / "history.json").read_text())
    for step in history["steps"]:  # inside the stream, only deploy and eval ran again
        assert step["status"] == {"init": "cached", "train": "cached", "store": "cached",
                                  "deploy": "computed", "eval": "computed"}
    second = json.loads((proj / "outputs" / "metrics.json").read_text())
    assert second != first

    # dvc metrics diff / plots diff read the committed revision against the workspace
    diff = json.loads(sh(proj, env, "dvc", "metrics", "diff", "--json"))["outputs/metrics.json"]
    assert {k: (v["old"], v["new"]) for k, v in diff.items()} == {
        k: (first[k], second[k]) for k in first if first[k] != second[k]}
    sh(proj, env, "dvc", "plots", "diff", "HEAD", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").stat().st_size > 0
    shown = json.loads(sh(proj, env, "dvc", "plots", "show", "--json"))["data"]  # each plot once
    assert sorted(shown) == sorted(["A_KA, A_ZS and GM over tasks", "ACC and BWT over tasks",
                                    "outputs/plots/accuracy_matrix.png", "outputs/plots/metrics.png"])

    # an experiment: dvc exp run changes a param, reruns what it touches, and exp show lists its metrics
    sh(proj, env, "git", "checkout", "-q", "--", ".")
    ran_exp = sh(proj, env, "dvc", "exp", "run", "--name", "ft", "--set-param", "strategy.deploy.mode=ft")
    assert ran(ran_exp) == ["stream", "report"]
    rows = json.loads(sh(proj, env, "dvc", "exp", "show", "--json"))
    exps = [e for row in rows for e in row.get("experiments") or []]
    got = {e["name"]: e["revs"][0]["data"]["metrics"]["outputs/metrics.json"]["data"] for e in exps}
    assert set(got) == {"ft"} and set(got["ft"]) == set(first) and got["ft"] != first
    baseline = next(row for row in rows if row.get("experiments"))  # the commit the experiment branched from
    assert baseline["data"]["metrics"]["outputs/metrics.json"]["data"] == first
