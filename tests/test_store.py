"""The checkpoint store: content addressing, atomic writes, verification, de-duplication."""
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import perturb

from chronomerge.merge import merge
from chronomerge.statedict import CorruptCheckpointError, LazyStateDict
from chronomerge.store import CheckpointStore, NonFiniteError


def nbytes(sd, prefix=""):
    return sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith(prefix))


def test_put_get_round_trip_and_metadata(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base", data_digest="d0", extra={"model": "chronoclip-tiny"})
    loaded = store.load(oid)
    assert list(loaded) == sorted(tiny_base)
    assert all(torch.equal(loaded[k], tiny_base[k]) for k in tiny_base)
    meta = store.meta(oid)
    assert meta["kind"] == "base" and meta["data_digest"] == "d0" and meta["extra"]["model"] == "chronoclip-tiny"
    assert meta["code_version"] and meta["time"] > 0


def test_ids_are_content_addresses_stable_across_processes(tmp_path, tiny_base):
    oid = CheckpointStore(tmp_path / "a").put(tiny_base, kind="base")
    script = textwrap.dedent(f"""
        from chronomerge.models import create_model
        from chronomerge.store import CheckpointStore, NonFiniteError
        sd = create_model(seed=0).state_dict()
        print(CheckpointStore({str(tmp_path / 'b')!r}).put(sd, kind="base"))
    """)
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[
        -1
    ]
    assert other == oid
    assert CheckpointStore(tmp_path / "a").put(tiny_base, kind="expert") != oid  # identity is part of the id


def test_writing_the_same_object_twice_is_a_no_op(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    a = store.put(tiny_base, kind="base")
    mtime = store.path(a).stat().st_mtime_ns
    assert store.put(tiny_base, kind="base") == a and store.path(a).stat().st_mtime_ns == mtime


def payload_bytes(path):
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header_len


def test_visual_only_experts_store_only_the_visual_tower(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    base_id = store.put(tiny_base, kind="base")
    before = store.disk_bytes()
    experts = [perturb(tiny_base, seed=s, only="visual.") for s in range(5)]
    ids = [store.put(e, kind="expert", parents=[base_id]) for e in experts]
    full, visual = nbytes(tiny_base), nbytes(tiny_base, "visual.")
    assert store.disk_bytes() - before < full + 5 * visual  # storing 5 full experts would cost 5 * full
    assert 5 * full > full + 5 * visual
    for oid in ids:  # each expert's data section holds exactly the visual tower's bytes
        assert payload_bytes(store.path(oid)) == visual
    assert payload_bytes(store.path(base_id)) == full
    for e, oid in zip(experts, ids):
        back = store.load(oid)
        assert all(torch.equal(back[k], e[k]) for k in e)


def test_deduplicated_tensors_resolve_through_chains(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    b = store.put(tiny_base, kind="base")
    e1 = perturb(tiny_base, 1, only="visual.")
    i1 = store.put(e1, kind="expert", parents=[b])
    e2 = dict(e1)
    e2["text_projection"] = e1["text_projection"] + 1
    i2 = store.put(e2, kind="expert", parents=[i1])
    back = store.load(i2)
    assert all(torch.equal(back[k], e2[k]) for k in e2)
    table = store.record(i2)["tensors"]
    assert table["token_embedding.weight"][3] == b  # bytes held by the base, not re-copied
    assert table["visual.proj"][3] == i1 and table["text_projection"][3] is None


def test_corrupted_object_is_detected_and_named(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base")
    path = store.path(oid)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        CheckpointStore(tmp_path).load(oid)


def test_truncated_object_is_detected_and_named(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base")
    path = store.path(oid)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        CheckpointStore(tmp_path).get(oid)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        CheckpointStore(tmp_path).get(oid)


def test_altered_header_is_detected(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base", extra={"note": "aaaa"})
    path = store.path(oid)
    path.write_bytes(path.read_bytes().replace(b"aaaa", b"bbbb"))
    with pytest.raises(CorruptCheckpointError, match="does not match the object id"):
        CheckpointStore(tmp_path).meta(oid)


def test_a_writer_killed_mid_write_leaves_no_object(tmp_path, tiny_base):
    script = textwrap.dedent(f"""
        import os, signal, safetensors.torch as st
        from chronomerge.models import create_model
        from chronomerge.store import CheckpointStore, NonFiniteError
        real = st.save_file
        def dying(tensors, path, metadata=None):
            real(tensors, path, metadata)
            with open(path, "r+b") as f:
                f.truncate(1000)
            os.kill(os.getpid(), signal.SIGKILL)
        import chronomerge.store
        chronomerge.store.save_file = dying
        CheckpointStore({str(tmp_path)!r}).put(create_model(seed=0).state_dict(), kind="base")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    leftovers = os.listdir(tmp_path / "objects")
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # only the temp file
    store = CheckpointStore(tmp_path)  # opening cleans temp files of dead writers
    assert os.listdir(tmp_path / "objects") == [] and store.ids() == []


def test_merge_streams_from_the_store_and_from_plain_files(tmp_path, tiny_base, tiny_experts):
    store = CheckpointStore(tmp_path)
    b = store.put(tiny_base, kind="base")
    ids = [store.put(e, kind="expert", parents=[b]) for e in tiny_experts]
    lazy = merge("ties", store.get(b), [store.get(i) for i in ids])
    eager = merge("ties", tiny_base, tiny_experts)
    assert all(torch.equal(lazy[k], eager[k]) for k in eager)
    from safetensors.torch import save_file
    save_file(tiny_base, tmp_path / "base.safetensors")
    plain = LazyStateDict.from_file(tmp_path / "base.safetensors")
    assert plain.shape("visual.proj") == tuple(tiny_base["visual.proj"].shape)
    assert torch.equal(plain["visual.proj"], tiny_base["visual.proj"])


def test_bad_store_input_is_rejected(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="kind must be one of"):
        store.put(tiny_base, kind="weights")
    with pytest.raises(ValueError, match="parent checkpoint"):
        store.put(tiny_base, kind="expert", parents=["0" * 64])
    with pytest.raises(ValueError, match="not a checkpoint id"):
        store.load("../../etc/passwd")
    with pytest.raises(KeyError):
        store.load("f" * 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_checkpoint_is_refused_and_nothing_is_written(tmp_path, tiny_base, bad):
    store = CheckpointStore(tmp_path)
    base = store.put(tiny_base, kind="base")
    diverged = dict(tiny_base)
    name = sorted(diverged)[3]
    diverged[name] = diverged[name].clone().flatten().index_fill(0, torch.tensor([0]), bad).view_as(diverged[name])
    with pytest.raises(
        NonFiniteError, match=f"deployed checkpoint \\(dare_ties\\): tensor '{name}' has NaN or infinite"
    ):
        store.put(diverged, kind="deployed", parents=[base], technique="dare_ties")
    assert store.ids() == [base]
    assert not list((tmp_path / "objects").glob(".tmp-*"))


def test_a_unique_prefix_names_a_checkpoint_as_in_git(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base")
    assert store.resolve(oid[:8]) == oid and store.resolve(oid[:16].upper()) == oid and store.resolve(oid) == oid
    twin = oid[:6] + ("0" if oid[6] != "0" else "1") * 58  # another id sharing the first 6 digits
    store.path(twin).write_bytes(store.path(oid).read_bytes())
    with pytest.raises(ValueError, match=f"checkpoint prefix {oid[:6]} is ambiguous in .*: .*{oid[:16]}"):
        store.resolve(oid[:6])
    assert store.resolve(oid[:7]) == oid  # one more digit tells them apart
    with pytest.raises(ValueError, match="starts with"):
        store.resolve("ffff" if not oid.startswith("ffff") else "0000")
    with pytest.raises(ValueError, match="4 to 64 hex digits"):
        store.resolve("xyz1")


def test_temp_files_of_dead_writers_are_swept_and_no_others(tmp_path):
    """Audit: a kill between writing and renaming `.chronomerge/last-run.json` left its temp file for good."""
    from chronomerge.store import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale, live = tmp_path / f".tmp-{dead}-a1", tmp_path / f".tmp-{os.getpid()}-b2"
    copying = tmp_path / ".tmp-letters"  # arrivals.copy_dataset's temp copy: not a writer's temp file
    for p in (stale, live, copying):
        p.write_text("x")
    assert remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and copying.exists() and not stale.exists()
