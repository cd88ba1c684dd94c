"""The generated benchmark, its files and digests, the task streams, and the real-data adapters."""
import json

import numpy as np
import pytest
from PIL import Image

from chronomerge.data import catalog, load_split, prepare
from chronomerge.data.adapters import image_folder, manifest
from chronomerge.data.generate import generate
from chronomerge.data.streams import build_stream, task_split

SMALL = 0.05  # fraction of the catalog's split sizes used in tests


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare(root, seed=0, size_factor=SMALL)
    return root


def test_catalog_has_the_required_breadth():
    assert len(catalog.ADAPTATION) >= 20 and len(catalog.EVALUATION) >= 6
    assert any(d.kind == "retrieval" for d in catalog.ADAPTATION)
    assert any(d.target == "digit" for d in catalog.ADAPTATION)  # the real-image domain
    train_concepts = {c for d in catalog.ADAPTATION for c in d.concepts} | set(catalog.PRETRAIN.concepts)
    assert not {d.name for d in catalog.EVALUATION} & {d.name for d in catalog.ADAPTATION}
    assert len(train_concepts) > 40
    domains = {x for d in catalog.ALL.values() for x in d.domains}
    assert {"photo", "sketch", "painting", "pixel art", "inverted", "low light"} <= domains


def test_pretraining_pool_has_a_head_and_a_long_tail_over_every_concept_and_domain():
    pool = generate(catalog.PRETRAIN, "train", 0, 0.2)  # 4,000 images
    head = {c for c in catalog.PRETRAIN.mix[0][0].concepts}
    seen = {pool.classes[y] for y in pool.labels}
    adaptation = {c for d in catalog.ADAPTATION for c in d.classes if d.target == "concept"}
    assert adaptation <= seen  # every adaptation class name appears in pretraining...
    from chronomerge.data.render import concept
    head_names = {concept(c).name for c in head}
    share = np.mean([pool.classes[y] in head_names for y in pool.labels])
    tail_share = 1 - catalog.HEAD_SHARE
    # ...but rarely: the head's share is HEAD_SHARE plus the tail's draws of head concepts
    expected = catalog.HEAD_SHARE + tail_share * len(head) / len(catalog.PRETRAIN.mix[1][0].concepts)
    assert abs(share - expected) < 0.03
    words = {d for d in catalog.PRETRAIN.domains}
    assert {x for d in catalog.ADAPTATION for x in d.domains} - {"real"} <= words
    assert not any("digit" in c for c in pool.captions)  # handwritten digits stay unseen


def test_generation_is_deterministic_and_seeded():
    spec = catalog.ADAPTATION[0]
    a, b = generate(spec, "train", 0, SMALL), generate(spec, "train", 0, SMALL)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    c = generate(spec, "train", 1, SMALL)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.images, generate(spec, "test", 0, SMALL).images)


@pytest.mark.parametrize("name", [d.name for d in catalog.ADAPTATION + catalog.EVALUATION])
def test_every_dataset_is_class_balanced_with_captions(data_root, name):
    s = load_split(data_root, name, "test")
    assert s.images.shape[1:] == (32, 32, 3) and s.images.dtype == np.uint8
    counts = np.bincount(s.labels, minlength=len(s.classes))
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    assert len(s.captions) == len(s.labels) and all(s.captions) and s.templates
    assert s.images.std() > 5  # not blank


def test_label_and_caption_describe_the_image():
    s = generate(catalog.ALL["new-shapes-photo"], "train", 0, SMALL)
    for y, cap in zip(s.labels, s.captions):
        assert s.classes[y] in cap and cap.startswith("a photo of")
    digits = generate(catalog.ALL["handwritten-digits"], "test", 0, SMALL)
    assert all(f"digit {y}" in c for y, c in zip(digits.labels, digits.captions))


def test_prepare_records_digests_and_reuses_intact_datasets(data_root):
    manifest_json = json.loads((data_root / "manifest.json").read_text())
    assert set(manifest_json["datasets"]) == set(catalog.ALL)
    name = catalog.ADAPTATION[3].name
    path = data_root / name / "train.safetensors"
    mtime = path.stat().st_mtime_ns
    assert prepare(data_root, seed=0, size_factor=SMALL) == manifest_json["datasets"]
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    path.write_bytes(path.read_bytes()[:-5])  # damage it: the next prepare rewrites it
    assert prepare(data_root, seed=0, size_factor=SMALL)[name] == manifest_json["datasets"][name]


def test_the_data_folder_does_not_depend_on_the_order_its_datasets_were_made_in(tmp_path, data_root):
    """DVC hashes data/ with its manifest: a pipeline that made a task's datasets before the rest (as
    `chronomerge run` and the bench scripts do, in different orders) must leave the same bytes."""
    names = [d.name for d in catalog.ADAPTATION[:2] + catalog.EVALUATION[:1]]
    prepare(tmp_path, seed=0, names=names[::-1], size_factor=SMALL)
    prepare(tmp_path, seed=0, size_factor=SMALL)
    assert (tmp_path / "manifest.json").read_bytes() == (data_root / "manifest.json").read_bytes()


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare(tmp_path, names=["imagenet"])
    with pytest.raises(ValueError, match="size_factor"):
        prepare(tmp_path, size_factor=0)


@pytest.mark.parametrize("length", [20, 50, 100])
def test_dataset_incremental_streams_of_any_length(length):
    tasks = build_stream("dataset-incremental", length)
    assert len(tasks) == length and len({t.name for t in tasks}) == length
    n = len(catalog.ADAPTATION)
    assert [t.parts[0][0] for t in tasks[:n]] == [d.name for d in catalog.ADAPTATION][:length]


def test_repeated_rounds_train_on_disjoint_slices(data_root):
    tasks = build_stream("dataset-incremental", 2 * len(catalog.ADAPTATION))
    first, again = tasks[0], tasks[len(catalog.ADAPTATION)]
    a, b = task_split(data_root, first, "train"), task_split(data_root, again, "train")
    full = load_split(data_root, first.parts[0][0], "train")
    assert len(a.labels) + len(b.labels) == len(full.labels)
    assert not any((a.images[:, None] == b.images[None]).all(axis=(2, 3, 4)).any(axis=1))


def test_random_stream_deals_every_class_once(data_root):
    tasks = build_stream("random", 20, seed=3)
    dealt = [(d, c) for t in tasks for d, cs in t.parts for c in cs]
    expected = [(d.name, c) for d in catalog.ADAPTATION if d.kind == "classification" for c in range(len(d.classes))]
    assert sorted(dealt) == sorted(expected)
    s = task_split(data_root, tasks[0], "test")
    assert len(s.classes) >= 2 and set(np.unique(s.labels)) == set(range(len(s.classes)))


def test_stream_errors():
    with pytest.raises(ValueError, match=r"stream.kind='daily'.*\['dataset-incremental', 'random'\]"):
        build_stream("daily", 5)
    with pytest.raises(ValueError, match="stream.length=0"):
        build_stream("random", 0)


def _write_images(folder, n, colour=(255, 0, 0)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 20), colour).save(folder / f"{i}.png")


def test_image_folder_adapter(tmp_path):
    _write_images(tmp_path / "cat", 2)
    _write_images(tmp_path / "dog_house", 3, (0, 0, 255))
    split, digest = image_folder(tmp_path)
    assert split.classes == ["cat", "dog house"] and list(split.labels) == [0, 0, 1, 1, 1]
    assert split.images.shape == (5, 20, 40, 3) and split.images[0, 0, 0].tolist() == [255, 0, 0]  # native size
    assert image_folder(tmp_path)[1] == digest
    _write_images(tmp_path / "dog_house", 1, (0, 255, 0))
    assert image_folder(tmp_path)[1] != digest


def test_image_folder_errors_name_the_class_or_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="class 'empty' has no images"):
        image_folder(tmp_path)
    _write_images(tmp_path / "empty", 1)
    _write_images(tmp_path / "Empty", 1)
    with pytest.raises(ValueError, match="duplicate class name"):
        image_folder(tmp_path)
    (tmp_path / "Empty" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "Empty" / "0.png").unlink()
    (tmp_path / "Empty").rename(tmp_path / "other")
    with pytest.raises(ValueError, match=r"unreadable image .*broken\.png"):
        image_folder(tmp_path)


def test_manifest_adapters_csv_and_jsonl(tmp_path):
    _write_images(tmp_path / "img", 3)
    (tmp_path / "m.csv").write_text("path,label,caption\nimg/0.png,red,a red square\nimg/1.png,blue,\n")
    split, digest = manifest(tmp_path / "m.csv")
    assert split.classes == ["blue", "red"] and list(split.labels) == [1, 0]
    assert split.captions == ["a red square", "a photo of a blue."]
    rows = [{"path": "img/0.png", "label": "red", "caption": "a red square"}, {"path": "img/1.png", "label": "blue"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert manifest(tmp_path / "m.jsonl")[1] == digest


def test_manifest_errors(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nmissing.png,a\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path,label\nx.png,\n")
    with pytest.raises(ValueError, match="row 1 needs a 'path' and a 'label'"):
        manifest(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "label": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        manifest(tmp_path / "m.jsonl")
    _write_images(tmp_path / "img", 2)
    (tmp_path / "d.csv").write_text("path,label\nimg/0.png,Cat\nimg/1.png,cat\n")
    with pytest.raises(ValueError, match="duplicate class name"):
        manifest(tmp_path / "d.csv")


def test_a_changed_recipe_regenerates_the_dataset(tmp_path, monkeypatch):
    import chronomerge.data.generate as gen
    name = catalog.ADAPTATION[0].name
    prepare(tmp_path, names=[name], size_factor=SMALL)
    path = tmp_path / name / "train.safetensors"
    mtime = path.stat().st_mtime_ns
    prepare(tmp_path, names=[name], size_factor=SMALL)
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.setattr(gen, "GENERATOR_VERSION", "test")
    prepare(tmp_path, names=[name], size_factor=SMALL)
    assert path.stat().st_mtime_ns != mtime


def test_multitask_joins_every_class_of_the_stream(data_root):
    from chronomerge.data.streams import multitask
    for kind in ("dataset-incremental", "random"):
        tasks = build_stream(kind, 6, seed=2)
        joint = task_split(data_root, multitask(tasks), "test")
        parts = [task_split(data_root, t, "test") for t in tasks]
        assert len(joint.labels) == sum(len(p.labels) for p in parts)
        assert set(joint.classes) == {c for p in parts for c in p.classes}
