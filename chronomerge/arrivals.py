"""What arrives for the continual update service: find, check, register in arrival order.

`update.incoming` holds, one entry per new task:
* a dataset in chronomerge's format (`<name>/meta.json`, `train.safetensors`, `test.safetensors`,
  as `chronomerge data add` and the generator write them; `meta.json` last);
* a plain image folder (`<name>/<class>/<image>`) or a manifest (`<name>.csv` / `<name>.jsonl`),
  converted with `chronomerge data add`'s rules (stratified 80/20 split, native image size);
* an expert trained elsewhere (`<name>/` with a Hugging Face CLIP `config.json`, or
  `<name>.safetensors` in open_clip's keys): imported instead of trained, and evaluated on the
  dataset `<name>` when one has arrived (or is under the data root).
Move a finished folder in (`mv` is atomic within a file system) rather than copying it there.

The record `.chronomerge/arrivals.json` lists the registered entries in arrival order with their
digests; registering copies a dataset (converted, for folders and manifests) under the data root
and an expert under `<data root>/.experts/`, whole or not at all. An entry that cannot be read,
changed after it was registered, or clashes with a different one of the same name is rejected
with the reason; an entry that is none of the above (or a dataset without its `meta.json` yet)
is skipped with the reason. Both are reported on every update, never silently passed over, and
each rejection is kept in `.chronomerge/rejected.json` (entry → reason, first and last seen); a
rejected entry never blocks a later one.

`chronomerge withdraw NAME` takes a registered arrival back: its record entry is marked withdrawn
(with the time and reason), the incoming entry moves to `<incoming>/.withdrawn/` and its copy under
the data root to `<data root>/.withdrawn/` (nothing is deleted), and the next update rebuilds the
stream without it. The same name may arrive again, as new data.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from chronomerge.checkpoints import is_checkpoint, read_checkpoint
from chronomerge.data.adapters import MANIFEST_SUFFIXES, NAME, add_dataset, source_kind
from chronomerge.data.generate import check_dataset, dataset_digest
from chronomerge.store import atomic_write_json, tree_digest

ARRIVALS = Path(".chronomerge") / "arrivals.json"
EXPERTS = ".experts"  # under the data root: imported experts, one folder or file each
STREAM_KIND = "arrivals"  # stream.kind of an update's stream: stream.tasks, whole, in arrival order


REJECTED = Path(".chronomerge") / "rejected.json"
WITHDRAWN = ".withdrawn"  # under the incoming folder and the data root: what `withdraw` took back


def read_arrivals(project: Path) -> list[dict]:
    """The whole arrivals record, withdrawn entries included (`active` leaves them out)."""
    path = Path(project) / ARRIVALS
    return json.loads(path.read_text()) if path.exists() else []


def active(record: list[dict]) -> list[dict]:
    """The arrivals an update's stream is made of: the record without withdrawn entries."""
    return [a for a in record if "withdrawn" not in a]


def record_rejections(project: Path, rejected: list[dict]) -> None:
    """Keep each rejected entry with its reason in `.chronomerge/rejected.json` (first and last seen)."""
    now = time.time()
    path = Path(project) / REJECTED
    kept = json.loads(path.read_text()) if path.exists() else {}
    changed = False
    for r in rejected:
        if r.get("status") != "rejected":
            continue
        previous = kept.get(r["name"], {})
        kept[r["name"]] = {"reason": r["reason"], "first_seen": previous.get("first_seen", now), "last_seen": now}
        changed = True
    if changed:
        atomic_write_json(path, kept)


def _aside(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` (made if missing) under a name not taken yet; returns where it went."""
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target, n = folder / f"{path.name}.{n}", n + 1
    path.rename(target)
    return target


def withdraw(project: Path, incoming: Path, data_root: Path, name: str, reason: str) -> list[str]:
    """Take the registered arrival `name` back (see the module's docstring); returns what moved where.
    Hold the update lock around it: an update must not read the record half-changed."""
    record = read_arrivals(project)
    found = [i for i, a in enumerate(record) if a["name"] == name and "withdrawn" not in a]
    if not found:
        names = [a["name"] for a in active(record)]
        raise ValueError(f"withdraw: {name!r} is not a registered arrival; registered: {names or 'none'}")
    a = record[found[-1]]
    moved = []
    for path, folder in ((Path(incoming) / a["entry"], Path(incoming) / WITHDRAWN),
                         (Path(data_root) / (f"{EXPERTS}/{a['entry']}" if a.get("kind") == "expert" else name),
                          Path(data_root) / WITHDRAWN)):
        if path.exists():
            moved.append(f"{path} → {_aside(path, folder)}")
    record[found[-1]] = {**a, "withdrawn": time.time(), "withdraw_reason": reason}
    atomic_write_json(Path(project) / ARRIVALS, record)
    return moved




def classify(entry: Path) -> tuple[str | None, str]:
    """(kind, reason): kind 'dataset' | 'folder' | 'manifest' | 'expert', or None with why not."""
    if entry.name.startswith("."):
        return None, "hidden"
    if entry.is_dir() and (entry / "meta.json").exists():
        return "dataset", ""
    if is_checkpoint(entry):
        return "expert", ""
    if kind := source_kind(entry):
        return kind, ""
    if entry.is_dir() and any(p.suffix == ".safetensors" for p in entry.iterdir()):
        return None, "dataset files without meta.json (still arriving?)"
    return None, ("not a dataset (meta.json), an image folder (class sub-folders of images), a manifest "
                  f"({', '.join(MANIFEST_SUFFIXES)}) or an expert (a Hugging Face CLIP folder or a .safetensors file)")


def _task_name(entry: Path) -> str:
    return entry.stem if entry.is_file() else entry.name


def scan(incoming: Path, data_root: Path, known: list[dict]) -> tuple[list[dict], list[dict]]:
    """(new arrivals in arrival order, rejected or skipped ones with a reason) in `incoming`."""
    registered = {a.get("entry", a["name"]): a["digest"] for a in active(known)}
    entries = (
        sorted(Path(incoming).iterdir(), key=lambda f: (f.stat().st_mtime, f.name)) if Path(incoming).is_dir() else []
    )
    new, rejected = [], []
    for entry in entries:
        kind, why = classify(entry)
        name = _task_name(entry)
        if kind is None:
            if why != "hidden":
                rejected.append({"name": entry.name, "status": "skipped", "reason": why})
            continue
        if not NAME.match(name):
            rejected.append({"name": entry.name, "status": "rejected",
                             "reason": "a task name takes letters, digits, '.', '_' or '-'"})
            continue
        digest = dataset_digest(entry) if kind == "dataset" else tree_digest(entry)
        if entry.name in registered:
            if digest != registered[entry.name]:
                rejected.append({"name": name, "status": "rejected", "reason": "changed after it was registered; "
                                                         "new data for a task arrives under a new name"})
            continue
        try:
            if kind == "dataset":
                check_dataset(entry)
            elif kind == "expert":
                read_checkpoint(entry)
        except Exception as e:  # noqa: BLE001 - any unreadable arrival is rejected with its reason
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            rejected.append({"name": name, "status": "rejected", "reason": f"unreadable or invalid: {why}"})
            continue
        target = Path(data_root) / (f"{EXPERTS}/{entry.name}" if kind == "expert" else name)
        if kind == "dataset" and target.exists() and dataset_digest(target) != digest:
            rejected.append(
                {
                    "name": name,
                    "status": "rejected",
                    "reason": f"a different dataset named {name!r} is already in {data_root}",
                }
            )
            continue
        new.append({"name": name, "digest": digest, "kind": kind, "entry": entry.name, "arrived": time.time()})
    return new, rejected


def stream_tasks(record: list[dict], data_root: Path) -> list:
    """The update stream's `stream.tasks`: a dataset name per data arrival, and `{path, dataset}` per
    expert (its dataset: the arrived or present dataset of the same name, if any)."""
    record = active(record)
    datasets = {a["name"] for a in record if a.get("kind", "dataset") != "expert"}
    out: list = []
    for a in record:
        if a.get("kind", "dataset") != "expert":
            out.append(a["name"])
        else:
            has = a["name"] in datasets or (Path(data_root) / a["name"] / "meta.json").exists()
            out.append({"path": str(Path(data_root) / EXPERTS / a["entry"]), "dataset": a["name"] if has else None})
    return out


def copy_dataset(source: Path, target: Path) -> None:
    """Copy a folder (or file) so that `target` appears whole or not at all (temp copy, rename)."""
    tmp = Path(target).with_name(f".tmp-{Path(target).name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if Path(source).is_dir():
        shutil.copytree(source, tmp)
    else:
        shutil.copyfile(source, tmp)
    tmp.rename(target)


def digest_arrived(data_root: Path, names: list[str], digests: dict[str, str]) -> dict[str, str]:
    """`digests` plus the digest of each arrived dataset under `data_root` it does not name yet."""
    out = dict(digests)
    for name in names:
        if name not in out:
            folder = Path(data_root) / name
            if not (folder / "meta.json").exists():
                raise FileNotFoundError(f"dataset {name!r} is not under {data_root} (no {folder / 'meta.json'}); "
                                        f"add it with: chronomerge data add PATH --name {name}")
            out[name] = dataset_digest(folder)
    return out


def register(project: Path, incoming: Path, data_root: Path, known: list[dict], new: list[dict]) -> list[dict]:
    """Copy each new dataset (converted from a folder or manifest) or expert under `data_root` and
    append it to the arrivals record `known`; returns the record.

    Copies land before the record names them: a crash in between leaves a copy that the next scan
    finds identical and registers."""
    for a in new:
        source = Path(incoming) / a["entry"]
        target = Path(data_root) / (f"{EXPERTS}/{a['entry']}" if a["kind"] == "expert" else a["name"])
        if target.exists():
            continue
        if a["kind"] in ("folder", "manifest"):
            add_dataset(source, data_root, a["name"])
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_dataset(source, target)
    record = known + new
    atomic_write_json(Path(project) / ARRIVALS, record)
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
