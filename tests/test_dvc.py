"""DVC: `dvc repro` runs prepare → pretrain → stream → report and reruns only what a change touches."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY_PARAMS

REPO = Path(__file__).resolve().parents[1]


def sh(cwd: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


def test_dvc_repro_reruns_only_changed_stages(tmp_path, seeded_project, prefect_api):
    proj = tmp_path / "proj"
    proj.mkdir()
    for d in ("chronomerge", "tasks", "flows"):
        shutil.copytree(REPO / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore"):
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

    assert ran(sh(proj, env, "dvc", "repro")) == ["prepare", "pretrain", "stream", "report"]
    first = json.loads((proj / "outputs" / "metrics.json").read_text())
    assert ran(sh(proj, env, "dvc", "repro")) == []

    params["strategy"]["deploy"]["mode"] = "all"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(proj, env, "dvc", "repro")) == ["stream", "report"]
    history = json.loads((proj / "outputs" / "history.json").read_text())
    for step in history["steps"]:  # inside the stream, only deploy and eval ran again
        assert step["status"] == {"init": "cached", "train": "cached", "store": "cached",
                                  "deploy": "computed", "eval": "computed"}
    assert json.loads((proj / "outputs" / "metrics.json").read_text())["deployed"] != first["deployed"]

    shown = sh(proj, env, "dvc", "metrics", "show", "--json")
    assert "GM" in shown and "A_KA" in shown
    sh(proj, env, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").stat().st_size > 0
