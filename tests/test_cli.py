"""The `chronomerge` command line on real safetensors files."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chronomerge.merge import merge
from chronomerge.store import CheckpointStore
from flows.cli import main


def test_merge_command_writes_the_merged_checkpoint(tmp_path, tiny_base, tiny_experts, capsys):
    save_file(tiny_base, tmp_path / "base.safetensors")
    paths = []
    for i, e in enumerate(tiny_experts[:3]):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file(e, paths[-1])
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", "ties", "--base", str(tmp_path / "base.safetensors"), "--models", *map(str, paths),
               "--out", str(out), "--set", "keep=0.5", "--device", "cpu"])
    assert rc == 0 and out.exists()
    expected = merge("ties", tiny_base, tiny_experts[:3], keep=0.5)
    got = load_file(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_merge_command_rejects_a_bad_hyperparameter_before_reading_weights(tmp_path, capsys):
    rc = main(["merge", "ties", "--base", str(tmp_path / "missing.safetensors"), "--models", "x",
               "--out", str(tmp_path / "o.safetensors"), "--set", "keep=2"])
    assert rc == 2 and "keep=2 is not allowed; expected a real number in (0, 1]" in capsys.readouterr().err


def test_verify_reports_corrupt_objects(tmp_path, tiny_base, capsys):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base")
    assert main(["verify", str(tmp_path)]) == 0
    path = store.path(oid)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path)]) == 1
    assert f"CORRUPT {oid}" in capsys.readouterr().out


def test_console_script_lists_techniques():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "techniques"], capture_output=True, text=True,
                         check=True).stdout
    assert "ties" in out and "keep=0.2" in out and "Yadav" in out
    from chronomerge.merge import CONTINUAL, TECHNIQUES
    listed = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace() and ":" not in line[:30]}
    assert set(TECHNIQUES) | set(CONTINUAL) <= listed  # every technique and continual merger is a row
    assert all(cls.reference in out for cls in CONTINUAL.values())
    assert "projection='block'" in out  # continual mergers' defaults are listed too


def _cli(project, prefect_api, *args, **kw):
    """`chronomerge ARGS` in a subprocess in the project, against the session's Prefect server."""
    import os

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_exit_codes_say_what_went_wrong_in_one_line(project, prefect_api):
    bad = _cli(project, prefect_api, "run", "--set", "train.lr=-1")
    out, err = bad.communicate(timeout=300)
    assert bad.returncode == 2  # a configuration error
    assert err.splitlines() == ["error: params.yaml: train.lr: Input should be greater than 0 (got -1)"]
    diverged = _cli(project, prefect_api, "run", "--set", "train.lr=1e30", "--set", "stream.length=1")
    out, err = diverged.communicate(timeout=300)
    assert diverged.returncode == 1  # a failure of the run
    assert len(err.splitlines()) == 1, err  # no traceback, no Prefect log lines
    (line,) = err.splitlines()
    assert line.startswith("error: task 1/1 t000-") and ", stage train: refusing to store the expert" in line
    assert line.count("diverged") == 1 and line.endswith("(--debug shows the traceback)")


def _processes_of(home: Path) -> list[int]:
    """Pids of the live processes started with PREFECT_HOME=`home` (a command and the servers it started)."""
    mine = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                mine.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            pass
    return mine


def test_a_bad_architecture_is_refused_and_leaves_no_prefect_server_running(tmp_path):
    """The temporary server boots while the params are checked beyond their schema; a refusal stops it."""
    import os

    (tmp_path / "params.yaml").write_text("model:\n  name: no-such-architecture\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: model.name: unknown open_clip architecture 'no-such-architecture'")
    assert _processes_of(tmp_path / ".prefect") == []


@pytest.mark.parametrize("after", [1, 20], ids=["while-starting", "inside-training"])
def test_ctrl_c_stops_at_once_with_exit_130_and_the_rerun_resumes(project, prefect_api, after):
    import signal
    import time

    run = _cli(project, prefect_api, "run", "--set", "train.steps=4000")
    time.sleep(after)  # 1 s: still importing torch and Prefect; 20 s: inside the first task's training
    assert run.poll() is None
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert err.splitlines() == ["interrupted: rerun the same command to resume (finished stages are cached)"]


def test_every_command_and_option_says_what_it_is_for():
    import argparse

    from flows.cli import parser

    def check(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    assert sub.description, f"{path} {name}: no description"
                    check(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{path}: {action.option_strings or action.dest} has no help"

    check(parser(), "chronomerge")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("chronomerge ")
