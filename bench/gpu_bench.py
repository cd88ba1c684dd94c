"""The GPU path at real scale, one command: every figure of the GPU targets in one run on one device.

    python bench/gpu_bench.py                                   # on a GPU: ViT-B-16 (and ViT-B-32)
    python bench/gpu_bench.py --device cpu --model chronoclip-tiny --batch 16 --steps 6 \\
        --encode 64 --compare-model none --skip stream --out /tmp/smoke.json     # a CPU smoke run

Writes `bench/results-gpu-<device>.json` (the device as `torch.cuda.get_device_name()`, spaces as
dashes) unless `--out` says otherwise. Keys, each measured in this run:

  device                     the device's name
  train_img_s                chronomerge's training loop, `--model` (ViT-B-16), batch 512, bf16, compiled
  bare_compiled_img_s        a bare open_clip loop, same model, data and settings      (target: train ≥ 95%)
  train_ratio                train_img_s / bare_compiled_img_s
  compare_train              the same pair for `--compare-model` (ViT-B-32)
  eval_img_s                 evaluation encoding (`encode_images`), images stored at the input size
  eval_img_s_stored_32       the same from 32×32 images resized on the device (the embedded benchmark)
                                                                          (target: ≥ 6,000 img/s on an H100)
  opcm_step_s                one OPCM update of the visual tower, released conventions  (target ≤ 0.3 s)
  opcm_step_eq5_s            the same under the paper's Eq. 5 conventions
  average_k8_s, ties_k8_s    plain averaging and TIES (exact per-tensor top 20%) of K = 8 task vectors
  ties_over_average          their ratio                                              (target ≤ 5)
  streamed                   K = 2 and K = 8 merges streamed from safetensors files on the device, each in
                             its own process: peak host RSS and peak GPU memory (must not grow with K)
  stream_overhead_fraction   a whole stream through the pipeline (`bench/pipeline_bench.py`): 8 tasks of
                             the embedded benchmark at the model's input size; the share of wall time
                             outside train, merge and eval stages                      (target ≤ 0.10)
  stream                     that run's figures: stage seconds, wall time, rerun time

Synthetic inputs are random (training images, task vectors θ0 + 0.01·N(0, 1)); the throughput of
real data is the same once it is on the device.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import merge_bench  # noqa: E402
import train_throughput  # noqa: E402

from chronomerge.merge.opcm import PAPER  # noqa: E402
from chronomerge.models import create_model  # noqa: E402

PARTS = ("train", "eval", "merge", "opcm", "streamed", "stream")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--compare-model", default="ViT-B-32", help="a second model for training throughput, or none")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--encode", type=int, default=8192, help="images encoded for the evaluation figures")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stream-tasks", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--out", type=Path, help="default: bench/results-gpu-<device>.json")
    args = p.parse_args()
    dev = torch.device(args.device)
    compile_ = dev.type == "cuda"
    name = device_name(dev)
    out = {"device": name, "model": args.model, "torch": torch.__version__, "batch": args.batch, "compile": compile_}
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if "train" not in args.skip:
        t = train_throughput.measure(args.model, args.batch, args.steps, dev, compile_, encode=args.encode)
        out.update(train_img_s=t["chronomerge_img_per_s"], bare_compiled_img_s=t["bare_img_per_s"],
                   train_ratio=t["ratio"], eval_img_s=t["encode_img_per_s"])
        say(f"train {args.model}: chronomerge {t['chronomerge_img_per_s']} img/s, bare {t['bare_img_per_s']} img/s")
        if args.compare_model != "none":
            c = train_throughput.measure(args.compare_model, args.batch, args.steps, dev, compile_, encode=args.encode)
            out["compare_train"] = {k: c[k] for k in ("model", "chronomerge_img_per_s", "bare_img_per_s", "ratio",
                                                      "encode_img_per_s")}
            say(f"train {args.compare_model}: {out['compare_train']}")
    if "eval" not in args.skip:
        images = np.random.default_rng(0).integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
        rate = train_throughput.encode_rate(create_model(args.model).to(dev), images, dev, args.encode)
        out["eval_img_s_stored_32"] = round(rate, 1)
        say(f"eval {args.model} from 32x32 images: {rate:.0f} img/s")
    if "merge" not in args.skip:
        rows = merge_bench.bench_techniques(args.model, [8], args.device, ["average", "ties"], args.repeat)
        secs = {r["technique"]: r["seconds"] for r in rows}
        out.update(
            average_k8_s=secs["average"], ties_k8_s=secs["ties"], ties_over_average=secs["ties"] / secs["average"]
        )
    if "opcm" not in args.skip:
        out["opcm_step_s"] = merge_bench.bench_opcm(args.model, args.device, args.repeat)["opcm_update_seconds"]
        out["opcm_step_eq5_s"] = merge_bench.bench_opcm(args.model, args.device, args.repeat,
                                                        dict(PAPER))["opcm_update_seconds"]
    if "streamed" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            rows = merge_bench.bench_streamed(args.model, [2, 8], ["average", "ties"], Path(d), args.device)
        out["streamed"] = [{k: r[k] for k in ("technique", "k", "seconds", "peak_rss_bytes", "cuda_peak_bytes",
                                              "model_bytes")} for r in rows]
    if "stream" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            res = Path(d) / "pipeline.json"
            sets = [f"model.name={args.model}", f"stream.length={args.stream_tasks}", f"device={args.device}",
                    f"train.batch_size={min(args.batch, 256)}", f"train.compile={str(compile_).lower()}"]
            subprocess.run([sys.executable, str(BENCH / "pipeline_bench.py"), "--project", str(Path(d) / "project"),
                            "--out", str(res), *[x for s in sets for x in ("--set", s)]], check=True)
            stream = json.loads(res.read_text())
        out.update(stream_overhead_fraction=stream["overhead_share"], stream=stream)
    text = json.dumps(out, indent=1)
    print(text)
    path = args.out or BENCH / f"results-gpu-{name.replace(' ', '-')}.json"
    path.write_text(text + "\n")
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
