from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chronomerge.models import create_model


def pytest_collection_modifyitems(items):
    """The tests marked slow run first (a stable sort): started last, one would keep a single
    pytest-xdist worker busy after the other has finished (scripts/test.sh hands them out two at a
    time, so both workers get their share)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_base() -> dict[str, torch.Tensor]:
    """A real open_clip state dict of the embedded tiny config (pretrained=None, seeded)."""
    return {k: v.clone() for k, v in create_model(seed=0).state_dict().items()}


def perturb(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.01, only: str = "") -> dict[str, torch.Tensor]:
    """A fake expert: θ0 plus seeded noise on floating tensors whose name starts with `only`."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
                if v.dtype.is_floating_point and k.startswith(only) else v.clone())
            for k, v in sd.items()}


@pytest.fixture(scope="session")
def tiny_experts(tiny_base):
    return [perturb(tiny_base, seed=i + 1) for i in range(4)]


# -- pipeline fixtures: real Prefect (one local server per session), MLflow (SQLite), tiny data --
TINY_PARAMS = {"data": {"size_factor": 0.1}, "pretrain": {"steps": 20, "batch_size": 32},
               "stream": {"length": 3}, "train": {"steps": 5, "batch_size": 16}}


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API server for the whole session; yields its URL (for subprocesses too)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    import tasks  # noqa: F401  (environment defaults before Prefect starts)

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def seeded_project(tmp_path_factory, prefect_api):
    """Tiny datasets and a pretrained tiny base, made once (against the session's Prefect server); projects
    copy them."""
    from chronomerge.config import validate
    from chronomerge.stages import Workspace, run_base
    from flows.stream import check, prepare_inputs

    root = tmp_path_factory.mktemp("seed")
    cfg = validate(TINY_PARAMS)
    c = cfg.to_dict()
    ws = Workspace(str(root / "store"), str(root / "data"))
    arch, sets = check(cfg)
    prepare_inputs(cfg, ws, sets)
    run_base(ws, arch, c["model"], c["pretrain"], c["data"])
    return root


@pytest.fixture
def project(tmp_path, seeded_project, prefect_api, monkeypatch):
    """A fresh project directory (own store, data copy, Prefect result storage, MLflow database)."""
    import shutil

    import yaml
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    shutil.copytree(seeded_project / "data", tmp_path / "data")
    shutil.copytree(seeded_project / "store", tmp_path / "store")
    params = {**TINY_PARAMS, "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / ".prefect" / "storage"}):
        yield tmp_path


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image_folder(root, classes=("red", "green", "blue"), n=6, size=(48, 40), seed=0):
    """A user's image folder: class sub-folders of noisy one-colour PNGs (a size no model takes natively)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(np.array(COLOURS[c], np.float32) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def run_uninterrupted(folder: Path, seeded_project: Path, sets: list[str]) -> tuple[dict, dict]:
    """The TINY stream with `sets`, run without interruption in a project of its own at `folder` (this
    process): its summary and metrics.json."""
    import json
    import shutil

    import yaml
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from chronomerge.config import load_config
    from flows.stream import stream_flow

    for d in ("data", "store"):
        shutil.copytree(seeded_project / d, folder / d)
    (folder / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    cfg = load_config(folder / "params.yaml", [*sets, f"tracking.mlflow_uri=sqlite:///{folder}/mlflow.db"])
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: folder / ".prefect" / "storage"}):
        summary = stream_flow(cfg, project=str(folder), quiet=True)
    return summary, json.loads((folder / "outputs" / "metrics.json").read_text())
