"""Fault injection: kill, corrupt, feed bad input, race and fill the disk; count what survives.

    .venv/bin/python bench/faults.py [--kills 4] [--seed 0] [--out bench/results-faults.md] [--only GROUP ...]

Every trial runs the real command line (`python -m flows.cli`) in a scratch copy of one small
project (the tiny model, 3 tasks, a pretrained base), against one Prefect server for the suite:

* kill `run`: SIGKILL at random times, and at named points (`chronomerge.faults`: mid-write of an
  object, mid-way through a task's MLflow logging, mid-way through an expert's training and inside
  the write of its progress checkpoint); the rerun must deploy the reference checkpoint (identical)
  from a store that verifies clean.
* kill `update`: at each named point of an update and while `dvc add` runs; the rerun must record
  one decision naming every new arrival, the `dvc add` digest, the `latest` ref on the candidate,
  the uninterrupted update's candidate (identical) and no journal left.
* corrupt: flip a byte of the deployed object, truncate an expert, delete an object, plant a
  Prefect record of the wrong shape and one naming the pickle serializer; `verify` (or the run's
  warning) must detect it and the rerun repair it to the reference.
* bad input: each user mistake must exit 2 with one line and no traceback, leaving no temp file.
* race: three `run`s started at once in a fresh copy; all succeed with the reference checkpoint.
* disk full: the store on a tmpfs too small for the run (skipped where no tmpfs can be mounted);
  the run must fail with one line, leave no temp file, and rerun to the reference once there is room.

It prints (and writes to --out) one table: trials, survived (the command or its rerun exited as
it should), identical (the reference checkpoint), detected, repaired, clear errors.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402,F401  (Prefect's environment defaults)

PARAMS = {"data": {"size_factor": 0.1}, "pretrain": {"steps": 20, "batch_size": 32},
          "stream": {"length": 3}, "train": {"steps": 5, "batch_size": 16}}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
       "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
ENV.pop("PREFECT_HOME")  # each scratch project keeps its own (./.prefect), as a user's does


def cli(project: Path, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def start(project: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})}, start_new_session=True)


def deployed(done: subprocess.CompletedProcess | tuple) -> str | None:
    out = done.stdout if hasattr(done, "stdout") else done[0]
    return next((line.split()[-1] for line in out.splitlines() if line.startswith("deployed: ")), None)


def clean(project: Path, store: str = "store") -> bool:
    """The store verifies, and no temp file or progress checkpoint is left anywhere in the project."""
    temps = [p for p in project.rglob(".tmp-*") if ".venv" not in p.parts]
    progress = list((project / store / "progress").glob("*"))
    return cli(project, "verify", store).returncode == 0 and not temps and not progress


def one_line(done: subprocess.CompletedProcess) -> bool:
    err = done.stderr.strip()
    return err.startswith("error: ") and "\n" not in err and "Traceback" not in err


class Table:
    COLUMNS = ("trials", "survived", "identical", "detected", "repaired", "clear errors")

    def __init__(self):
        self.rows: dict[str, dict[str, list[bool]]] = {}

    def add(self, row: str, **checks: bool) -> None:
        r = self.rows.setdefault(row, {c: [] for c in self.COLUMNS})
        r["trials"].append(True)
        for k, v in checks.items():
            r[k.replace("_", " ")].append(bool(v))
        print(f"  {row}: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()), flush=True)

    def markdown(self) -> str:
        lines = ["| fault | " + " | ".join(self.COLUMNS) + " |", "|---" * (len(self.COLUMNS) + 1) + "|"]
        for row, r in self.rows.items():
            cells = [str(len(r["trials"]))] + [f"{sum(v)}/{len(v)}" if v else "–" for k, v in r.items()
                                               if k != "trials"]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def all_pass(self) -> bool:
        return all(all(v) for r in self.rows.values() for v in r.values())


def copy(seed: Path, scratch: Path, name: str) -> Path:
    target = scratch / name
    shutil.copytree(seed, target, symlinks=True)
    return target


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate()


def kill_runs(seed: Path, scratch: Path, table: Table, reference: str, ref_seconds: float, kills: int,
              rng: random.Random) -> None:
    for i in range(kills):
        project = copy(seed, scratch, f"kill-run-{i}")
        at = rng.uniform(3, 0.9 * ref_seconds)
        p = start(project, "run", "--quiet")
        time.sleep(at)
        kill_group(p)
        again = cli(project, "run", "--quiet")
        print(f"  (killed at {at:.0f} s)", flush=True)
        table.add("kill run at a random time", survived=again.returncode == 0,
                  identical=deployed(again) == reference, repaired=clean(project))
    # progress checkpoints every 2 of an expert's 5 steps: a kill at step 3 resumes at 2, one inside the
    # write of step 4's checkpoint skips that partial one and resumes at 2 (neither setting is in a cache key)
    every2 = ("--set", "resume.every_steps=2")
    for point in ("store:rename", "mlflow:task-run", "train:step:3", "train:checkpoint:4"):
        project = copy(seed, scratch, f"kill-{point.replace(':', '-')}")
        killed = cli(project, "run", "--quiet", *every2, env={"CHRONOMERGE_KILL_AT": point})
        again = cli(project, "run", "--quiet", *every2)
        table.add(f"kill run at {point}", survived=killed.returncode == -signal.SIGKILL and again.returncode == 0,
                  identical=deployed(again) == reference, repaired=clean(project))


def _arrive(project: Path) -> None:
    for name in ("letters-photo", "numerals-neon"):
        done = cli(project, "arrive", name)
        assert done.returncode == 0, done.stderr


def _decision_ok(project: Path, reference: str | None) -> tuple[bool, bool]:
    """(the record is complete, the candidate is the reference's)."""
    from chronomerge.promotion import JOURNAL, read_decisions
    from chronomerge.store import CheckpointStore

    decisions = read_decisions(project)
    if len(decisions) != 1:
        return False, False
    d = decisions[0]
    md5 = yaml.safe_load((project / "incoming.dvc").read_text())["outs"][0]["md5"]
    complete = (d["new"] == ["letters-photo", "numerals-neon"] and d["incoming_dvc_md5"] == md5
                and not (project / JOURNAL).exists()
                and (not d["promoted"] or CheckpointStore(project / "store").ref("latest") == d["candidate"]))
    return complete, reference is None or d.get("candidate") == reference


def kill_updates(seed: Path, scratch: Path, table: Table) -> None:
    project = copy(seed, scratch, "update-reference")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True, env=ENV)
    _arrive(project)
    assert cli(project, "update").returncode == 0
    reference = json.loads((project / ".chronomerge" / "promotions.json").read_text())[0]["candidate"]
    for point in ("update:registered", "update:versioned", "update:promoted", "during dvc add"):
        project = copy(seed, scratch, f"update-{point.replace(':', '-').replace(' ', '-')}")
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True, env=ENV)
        _arrive(project)
        if point == "during dvc add":
            p = start(project, "update")
            killed = _kill_when_child_runs(p, ("dvc", "add"))
        else:
            killed = cli(project, "update", env={"CHRONOMERGE_KILL_AT": point}).returncode == -signal.SIGKILL
        again = cli(project, "update")
        complete, same = _decision_ok(project, reference)
        label = f"kill update {point}" if point.startswith("during") else f"kill update at {point}"
        table.add(label, survived=killed and again.returncode == 0 and complete,
                  identical=same, repaired=clean(project))


def _kill_when_child_runs(p: subprocess.Popen, words: tuple[str, ...], timeout: float = 300) -> bool:
    """SIGKILL `p`'s process group as soon as one of its processes' command line holds `words`."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if os.getpgid(int(proc.name)) == p.pid and all(w.encode() in cmd for w in words):
                    kill_group(p)
                    return True
            except (OSError, ProcessLookupError):
                continue
        time.sleep(0.02)
    kill_group(p)
    return False


def corruptions(done_project: Path, scratch: Path, table: Table, reference: str) -> None:
    from chronomerge.store import CheckpointStore

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        data[(header + len(data)) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def expert(project: Path) -> Path:
        store = CheckpointStore(project / "store")
        oid = next(i for i in store.ids() if store.meta(i)["kind"] == "expert")
        return store.path(oid)

    def records(project: Path) -> list[Path]:
        return sorted(p for p in (project / ".prefect" / "storage").iterdir() if p.is_file())

    def wrong_shape(project: Path) -> None:
        for p in records(project):
            rec = json.loads(p.read_text())
            rec["result"] = json.dumps({"unexpected": [1, 2, 3]})
            p.write_text(json.dumps(rec))

    def pickle_record(project: Path) -> None:
        for p in records(project):
            rec = json.loads(p.read_text())
            rec["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle"}
            p.write_text(json.dumps(rec))

    faults = {
        "flip a byte of the deployed object": lambda pr: flip(CheckpointStore(pr / "store").path(reference)),
        "truncate an expert object": lambda pr: os.truncate(expert(pr), expert(pr).stat().st_size // 2),
        "delete an expert object": lambda pr: expert(pr).unlink(),
        "Prefect records of the wrong shape": wrong_shape,
        "Prefect records naming pickle": pickle_record,
    }
    for name, fault in faults.items():
        project = copy(done_project, scratch, "corrupt-" + name.replace(" ", "-"))
        fault(project)
        if "Prefect" in name:
            again = cli(project, "run", "--quiet")
            detected = "refused" in again.stderr if "pickle" in name else again.returncode == 0
        else:
            detected = cli(project, "verify", "store").returncode == 1 or name.startswith("delete")
            again = cli(project, "run", "--quiet")
        table.add(name, survived=again.returncode == 0, identical=deployed(again) == reference, detected=detected,
                  repaired=clean(project))


def bad_inputs(seed: Path, scratch: Path, table: Table) -> None:
    project = copy(seed, scratch, "bad-inputs")
    (project / "afile").write_text("a file")
    (project / "random.safetensors").write_bytes(os.urandom(4096))
    (project / "text.safetensors").write_text("hello")
    (project / "bad.csv").write_bytes(b"path,label\n\xff\xfeimg.png,a\n")
    (project / "bad.jsonl").write_text('["a.png", "a"]\n')
    cases = {
        "unknown model.name": ["run", "--set", "model.name=ViT-Nope"],
        "model.pretrained missing": ["run", "--set", "model.pretrained=missing.safetensors"],
        "model.pretrained random bytes": ["run", "--set", "model.pretrained=random.safetensors"],
        "model.pretrained a text file": ["run", "--set", "model.pretrained=text.safetensors"],
        "tracking.mlflow_uri=bogus://": ["run", "--set", "tracking.mlflow_uri=bogus://"],
        "paths.store a file": ["run", "--set", "paths.store=afile"],
        "a garbage store ref": ["export", "zzzz", "out.safetensors"],
        "a non-UTF-8 CSV manifest": ["data", "add", "bad.csv", "--name", "bad"],
        "a JSONL line that is a list": ["data", "add", "bad.jsonl", "--name", "bad"],
    }
    for name, argv in cases.items():
        done = cli(project, *argv)
        table.add(f"bad input: {name}", survived=done.returncode == 2, clear_errors=one_line(done),
                  repaired=clean(project))
    (project / "mlflow.db").write_bytes(os.urandom(8192))
    done = cli(project, "run")
    table.add("bad input: a garbage mlflow.db", survived=done.returncode == 2, clear_errors=one_line(done),
              detected="mlflow.db" in done.stderr)


def race(seed: Path, scratch: Path, table: Table, reference: str) -> None:
    project = copy(seed, scratch, "race")
    procs = [start(project, "run", "--quiet") for _ in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, out in zip(procs, outs):
        table.add("three runs at once in a fresh project", survived=p.returncode == 0,
                  identical=deployed(out) == reference)
    table.rows["three runs at once in a fresh project"]["repaired"].append(clean(project))


def disk_full(seed: Path, scratch: Path, table: Table, reference: str) -> None:
    project = copy(seed, scratch, "disk-full")
    mount = project / "small"
    mount.mkdir()
    size = sum(p.stat().st_size for p in (project / "store").rglob("*") if p.is_file())
    small = f"size={size // 1024 + 2048}k"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", small, "tmpfs", str(mount)], capture_output=True).returncode:
        print("  disk full: skipped (cannot mount a tmpfs here)", flush=True)
        return
    try:
        shutil.copytree(project / "store", mount / "store")
        full = cli(project, "run", "--quiet", "--set", "paths.store=small/store")
        detected = full.returncode == 1 and "no space left on device" in full.stderr
        no_temps = not list((mount / "store").rglob(".tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)
        again = cli(project, "run", "--quiet", "--set", "paths.store=small/store")
        table.add("disk full under the store", survived=again.returncode == 0, identical=deployed(again) == reference,
                  detected=detected, clear_errors=one_line(full), repaired=no_temps and clean(project, "small/store"))
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


GROUPS = ("kill-run", "kill-update", "corrupt", "bad-input", "race", "disk-full")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=4, help="random-time kills of `run`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results-faults.md")
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="these groups of trials only")
    args = ap.parse_args()
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    began = time.time()
    table = Table()
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        ENV["PREFECT_API_URL"] = PREFECT_API_URL.value()
        scratch = Path(tmp)
        seed = scratch / "seed"
        seed.mkdir()
        (seed / "params.yaml").write_text(yaml.safe_dump(PARAMS))
        for stage in ("prepare", "pretrain"):
            done = cli(seed, stage)
            assert done.returncode == 0, done.stderr
        ref_project = copy(seed, scratch, "reference")
        t0 = time.time()
        ref = cli(ref_project, "run", "--quiet")
        ref_seconds = time.time() - t0
        reference = deployed(ref)
        assert ref.returncode == 0 and reference, ref.stderr
        print(f"reference run: {ref_seconds:.0f} s, deployed {reference}", flush=True)
        runs = {"kill-run": lambda: kill_runs(seed, scratch, table, reference, ref_seconds, args.kills,
                                              random.Random(args.seed)),
                "kill-update": lambda: kill_updates(seed, scratch, table),
                "corrupt": lambda: corruptions(ref_project, scratch, table, reference),
                "bad-input": lambda: bad_inputs(seed, scratch, table),
                "race": lambda: race(seed, scratch, table, reference),
                "disk-full": lambda: disk_full(seed, scratch, table, reference)}
        for group in args.only:
            runs[group]()
    only = "" if list(args.only) == list(GROUPS) else " --only " + " ".join(args.only)
    text = (f"Fault injection (`.venv/bin/python bench/faults.py --kills {args.kills} --seed {args.seed}{only}`), "
            f"{time.time() - began:.0f} s on this machine:\n\n{table.markdown()}\n")
    print("\n" + text)
    args.out.write_text(text)
    return 0 if table.all_pass() else 1


if __name__ == "__main__":
    sys.exit(main())
