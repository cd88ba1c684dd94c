"""Arriving task data for the continual update service: find, check, register in arrival order.

`incoming/<name>/` is one new task's dataset in chronomerge's dataset format (`meta.json`,
`train.safetensors`, `test.safetensors`, as `chronomerge.data.generate` writes them); `meta.json`
is written last, so a folder without it is still arriving and is left for the next run. The record
`.chronomerge/arrivals.json` lists the registered datasets in arrival order with their digests;
registering copies a dataset under the data root (temp folder, then rename), where the stream reads it.
A dataset that cannot be read, changed after it was registered, or clashes with a different dataset
of the same name is rejected with the reason, and nothing is registered for it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from chronomerge.data.generate import dataset_digest, load_split
from chronomerge.store import atomic_write_bytes

ARRIVALS = Path(".chronomerge") / "arrivals.json"
STREAM_KIND = "arrivals"  # stream.kind of an update's stream: stream.tasks, whole, in arrival order

def read_arrivals(project: Path) -> list[dict]:
    path = Path(project) / ARRIVALS
    return json.loads(path.read_text()) if path.exists() else []


def _check(folder: Path) -> None:
    for split in ("train", "test"):
        s = load_split(folder.parent, folder.name, split)
        if len(s.labels) == 0 or not s.classes:
            raise ValueError(f"the {split} split is empty")


def scan(incoming: Path, data_root: Path, known: list[dict]) -> tuple[list[dict], list[dict]]:
    """(new arrivals in arrival order, rejected ones with a reason) among the folders of `incoming`."""
    registered = {a["name"]: a["digest"] for a in known}
    ready = [f for f in Path(incoming).iterdir() if f.is_dir() and (f / "meta.json").exists()] \
        if Path(incoming).is_dir() else []
    new, rejected = [], []
    for folder in sorted(ready, key=lambda f: ((f / "meta.json").stat().st_mtime, f.name)):
        name, digest = folder.name, dataset_digest(folder)
        if name in registered:
            if digest != registered[name]:
                rejected.append({"name": name, "reason": "changed after it was registered; "
                                                         "new data for a task arrives under a new folder name"})
            continue
        try:
            _check(folder)
        except Exception as e:  # noqa: BLE001 - any unreadable dataset is rejected with its reason
            rejected.append({"name": name, "reason": f"unreadable: {type(e).__name__}: {e}"})
            continue
        target = Path(data_root) / name
        if target.exists() and dataset_digest(target) != digest:
            rejected.append({"name": name, "reason": f"a different dataset named {name!r} is already in {data_root}"})
            continue
        new.append({"name": name, "digest": digest, "arrived": time.time()})
    return new, rejected


def copy_dataset(source: Path, target: Path) -> None:
    """Copy a dataset folder so that `target` appears whole or not at all (temp folder, rename)."""
    tmp = Path(target).with_name(f".tmp-{Path(target).name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    tmp.rename(target)


def digest_arrived(data_root: Path, names: list[str], digests: dict[str, str]) -> dict[str, str]:
    """`digests` plus the digest of each arrived dataset under `data_root` it does not name yet."""
    out = dict(digests)
    for name in names:
        if name not in out:
            folder = Path(data_root) / name
            if not (folder / "meta.json").exists():
                raise FileNotFoundError(f"stream.tasks names {name!r}, but {folder} holds no dataset")
            out[name] = dataset_digest(folder)
    return out


def register(project: Path, incoming: Path, data_root: Path, known: list[dict], new: list[dict]) -> list[dict]:
    """Copy each new dataset under `data_root` and append it to the arrivals record `known`;
    returns the record.

    Copies land before the record names them: a crash in between leaves a copy that the next scan
    finds identical and registers."""
    for a in new:
        target = Path(data_root) / a["name"]
        if not target.exists():
            copy_dataset(Path(incoming) / a["name"], target)
    record = known + new
    path = Path(project) / ARRIVALS
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return record


def version_with_dvc(project: Path, incoming: str) -> str | None:
    """`dvc add <incoming>` in a DVC project; returns the MD5 DVC recorded (None outside DVC)."""
    project = Path(project)
    if not (project / ".dvc").is_dir():
        return None
    done = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", incoming], cwd=project,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"dvc add {incoming} failed: {done.stderr.strip()[-2000:]}")
    meta = yaml.safe_load((project / f"{incoming.rstrip('/')}.dvc").read_text())
    return meta["outs"][0]["md5"]
