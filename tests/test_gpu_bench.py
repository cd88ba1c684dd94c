"""The GPU benchmark stays runnable as is: a CPU smoke run of every part but the pipeline stream
(which `bench/pipeline_bench.py` runs) produces every figure of the result file, each measured."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_run_on_the_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--device", "cpu", "--model",
                    "chronoclip-tiny", "--batch", "16", "--steps", "6", "--encode", "64", "--compare-model", "none",
                    "--repeat", "1", "--skip", "stream", "--out", str(out)], check=True, capture_output=True, text=True)
    r = json.loads(out.read_text())
    assert r["device"] == "cpu"
    for key in ("train_img_s", "bare_compiled_img_s", "eval_img_s", "eval_img_s_stored_32", "opcm_step_s",
                "opcm_step_eq5_s", "ties_k8_s", "average_k8_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["ties_over_average"] == r["ties_k8_s"] / r["average_k8_s"]
    assert sorted((s["technique"], s["k"]) for s in r["streamed"]) == [("average", 2), ("average", 8),
                                                                      ("ties", 2), ("ties", 8)]
    assert all(s["peak_rss_bytes"] > s["model_bytes"] for s in r["streamed"])
