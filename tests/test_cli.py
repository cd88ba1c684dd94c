"""The `chronomerge` command line on real safetensors files."""
import subprocess
import sys

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
