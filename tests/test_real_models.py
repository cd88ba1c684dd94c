"""Real open_clip architectures, users' datasets and experts from elsewhere, end to end.

ViT-B-32 and ViT-B-16 are open_clip's real configs with `pretrained=None` (no download); the HF
models are real `transformers` CLIP models built from small random configs and saved with
`save_pretrained`; the README's worked example is run command by command as written.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_image_folder
from mlflow import MlflowClient

from chronomerge.checkpoints import read_checkpoint
from chronomerge.config import ConfigError, load_config
from chronomerge.data import load_split
from chronomerge.data.adapters import add_dataset
from chronomerge.evaluate import score
from chronomerge.merge import merge
from chronomerge.models import architecture, create_model, get_tokenizer
from chronomerge.store import CheckpointStore
from flows.stream import STAGES, stream_flow

REPO = Path(__file__).resolve().parents[1]
def run_stream(project: Path, **params):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in params.items():
        raw[section] = {**raw.get(section, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return stream_flow(load_config(project / "params.yaml"), project=str(project), quiet=True)


@pytest.mark.slow
def test_vit_b_32_stream_runs_every_stage_end_to_end_on_the_cpu(project):
    for name in ("colours-a", "colours-b"):
        add_dataset(
            make_image_folder(project / "src" / name, seed=len(name)), project / "data", name, test_fraction=0.34
        )
    summary = run_stream(project, model={"name": "ViT-B-32"}, pretrain={"steps": 1, "batch_size": 4},
                         stream={"kind": "custom", "tasks": ["colours-a", "colours-b"], "length": 2},
                         train={"steps": 2, "batch_size": 4})
    assert [s["stage"] for s in summary["stages"]] == list(STAGES) * 2
    assert all(s["status"] == "computed" for s in summary["stages"])
    store = CheckpointStore(project / "store")
    deployed = store.load(summary["deployed"])
    assert tuple(deployed["visual.conv1.weight"].shape) == (768, 3, 32, 32)  # ViT-B-32, fed 224×224 inputs
    f = summary["final"]
    assert 0 <= f["A_KA"] <= 1 and f["A_ZS"] is None and f["GM"] is None  # no held-out sets: absent, not zero
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert "A_ZS" not in metrics and "GM" not in metrics and 0 <= metrics["A_KA"] <= 1  # numbers only (DVC)
    assert "| – |" in (project / "outputs" / "report.md").read_text()


def test_vit_b_16_merge_and_evaluation(tmp_path):
    arch = architecture("ViT-B-16")
    base = {k: v.clone() for k, v in create_model(arch, seed=0).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    experts = [
        {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        for _ in range(2)
    ]
    merged = merge("ties", base, experts, keep=0.2)
    model = create_model(arch)
    model.load_state_dict(merged)
    add_dataset(make_image_folder(tmp_path / "src", n=3), tmp_path / "data", "colours", test_fraction=1)
    split = load_split(tmp_path / "data", "colours", "test")
    assert split.images.shape[1:3] == (40, 48)  # stored at native size, resized by the model on read
    acc = score(model, get_tokenizer(arch), split, "cpu")
    assert 0 <= acc <= 1
    assert not torch.equal(merged["visual.conv1.weight"], base["visual.conv1.weight"])


def test_data_add_stores_native_images_with_a_stratified_split_and_refuses_what_it_cannot_read(tmp_path):
    src = make_image_folder(tmp_path / "src", n=5)
    meta = add_dataset(src, tmp_path / "data", "colours", test_fraction=0.4, templates=["a {c} thing."])
    assert meta["splits"]["train"]["n"] == 9 and meta["splits"]["test"]["n"] == 6  # 2 of 5 per class
    test = load_split(tmp_path / "data", "colours", "test")
    assert sorted(np.bincount(test.labels).tolist()) == [2, 2, 2] and test.templates == ["a {c} thing."]
    assert add_dataset(src, tmp_path / "data", "colours", test_fraction=0.4)["source_digest"] == meta["source_digest"]
    (tmp_path / "m.csv").write_text("path,label,caption\nsrc/red/0.png,red,a red square\nsrc/blue/0.png,blue,\n")
    with pytest.raises(ValueError, match="a different dataset named 'colours' is already in"):
        add_dataset(tmp_path / "m.csv", tmp_path / "data", "colours")
    assert add_dataset(tmp_path / "m.csv", tmp_path / "data", "two", test_fraction=0)["splits"].keys() == {"train"}
    with pytest.raises(ValueError, match="neither an image folder .* nor a manifest"):
        add_dataset(tmp_path / "data" / "colours" / "meta.json", tmp_path / "data", "x")
    with pytest.raises(ValueError, match=r"--templates .* must contain \{c\}"):
        add_dataset(src, tmp_path / "data", "y", templates=["a photo"])
    with pytest.raises(ValueError, match="--name 'letters-photo' is not allowed"):
        add_dataset(src, tmp_path / "data", "letters-photo")
    mixed = make_image_folder(tmp_path / "mixed", classes=("red",), n=2, size=(30, 20))
    make_image_folder(mixed, classes=("blue",), n=2, size=(64, 64))
    assert add_dataset(mixed, tmp_path / "data", "mixed")["image_size"] == [224, 224]


def test_a_bad_model_or_expert_is_one_clear_error_before_any_work(project, capsys):
    from flows.cli import main

    for sets, needle in (
        (["model.name=ViT-B-99"], "model.name: unknown open_clip architecture 'ViT-B-99'"),
        (
            ["model.pretrained=weights/missing.safetensors"],
            "model.pretrained: weights/missing.safetensors: no such file",
        ),
        (
            ["model.name=ViT-B-32", "model.pretrained=laion2b_s34b_b79k"],
            "model.pretrained: the weights of open_clip tag 'laion2b_s34b_b79k' for ViT-B-32 are not in the local",
        ),
        (["model.name=auto"], "model.name: 'auto' reads the architecture from model.pretrained"),
        (
            ["stream.kind=experts", "stream.length=1", "stream.experts=[{path: nowhere/expert}]"],
            "stream.experts.0.path: nowhere/expert: no such file or folder",
        ),
        (
            ["stream.kind=custom", "stream.length=1", "stream.tasks=[letters-photo]", "eval.held_out=[letters-photo]"],
            "eval.held_out: ['letters-photo'] are trained on by the stream",
        ),
    ):
        assert main(["run", *[x for s in sets for x in ("--set", s)]]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (project / "outputs").exists()  # nothing ran
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", "model.name=ViT-B-99"], cwd=project,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: model.name: unknown open_clip architecture")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="kind 'experts' takes its tasks from experts"):
        load_config(None, ["stream.kind=experts"])


# -- the README's worked example ----------------------------------------------------------------
def _readme_blocks():
    text = (REPO / "README.md").read_text()
    params = re.search(r"<!-- worked-example:params (\S+) -->\n```yaml\n(.*?)```", text, re.S)
    commands = re.search(r"<!-- worked-example:commands -->\n```bash\n(.*?)```", text, re.S)
    return params.group(1), params.group(2), [line for line in commands.group(1).splitlines() if line.strip()]


def _hf_models(root: Path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                              image_size=64, patch_size=16, projection_dim=24)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=32, projection_dim=24)
    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24))
    base.save_pretrained(root / "clip-base")
    for i, name in enumerate(("expert-a", "expert-b", "expert-c")):
        expert = CLIPVisionModel(vision)
        with torch.no_grad():  # the base's image tower, moved: an expert fine-tuned from it
            prefix = "vision_model." if any(k.startswith("vision_model.") for k in expert.state_dict()) else ""
            missing = expert.load_state_dict({prefix + k: v for k, v in base.vision_model.state_dict().items()},
                                             strict=False).missing_keys
            assert not [k for k in missing if "position_ids" not in k]
            g = torch.Generator().manual_seed(i + 1)
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        expert.save_pretrained(root / name)


@pytest.mark.slow
def test_the_readme_worked_example_runs_as_written(tmp_path, prefect_api):
    pytest.importorskip("transformers")
    params_name, params_text, commands = _readme_blocks()
    _hf_models(tmp_path / "hf")
    for i, task in enumerate(("task-a", "task-b", "task-c")):
        make_image_folder(tmp_path / "images" / task, seed=i)
    make_image_folder(tmp_path / "images" / "zero-shot", classes=("red", "blue"), n=4, seed=9)
    (tmp_path / params_name).write_text(params_text + f"tracking: {{mlflow_uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / ".prefect" / "storage")}
    outputs = []
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "chronomerge"
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)
    run_line = next(c for c in commands if " run " in f"{c} ")
    run_out = outputs[commands.index(run_line)]
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", *shlex.split(run_line)[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "15/15 stages cached" in rerun.stdout, rerun.stdout + rerun.stderr
    deployed = re.search(r"deployed: ([0-9a-f]{64})", run_out).group(1)
    assert re.search(r"A_ZS \d+\.\d+", run_out)  # a held-out set was given: A_ZS is measured
    store = CheckpointStore(tmp_path / "store")
    meta = store.meta(store.meta(deployed)["parents"][1])  # deployed ← (state, expert, base)
    assert meta["technique"] == "import" and meta["extra"]["format"] == "hf-clip-vision"
    assert meta["extra"]["source"] == str((tmp_path / "hf" / "expert-c").resolve())
    assert meta["extra"]["source_digest"] == read_checkpoint(tmp_path / "hf" / "expert-c").digest()
    lineage = subprocess.run([sys.executable, "-m", "flows.cli", "lineage", deployed, "--params", params_name],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert lineage.returncode == 0 and f"source={tmp_path / 'hf' / 'expert-a'}" in lineage.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    task_runs = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                                   f"tags.`lineage.deployed` = '{deployed}' and tags.`chronomerge.t` = '3'")
    assert len(task_runs) == 2  # the run and its cached rerun
    for r in task_runs:
        assert r.data.tags["lineage.expert.source"] == str((tmp_path / "hf" / "expert-c").resolve())
        assert r.data.tags["lineage.expert.format"] == "hf-clip-vision"
    ours, cli = store.load(deployed), read_checkpoint(tmp_path / "merged.safetensors")
    assert cli.name and cli.config  # the merge records its architecture
    assert sorted(ours) == sorted(cli.state)
    for k in ours:
        assert torch.allclose(ours[k].float(), cli.state[k].float(), atol=1e-6), k
