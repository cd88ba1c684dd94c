"""Merge benchmark: every technique on open_clip-shaped state dicts, K experts, CPU and GPU.

    python bench/merge_bench.py                      # ViT-B-16, K = 2 and 8, every device present
    python bench/merge_bench.py --model chronoclip-tiny --k 2 8   # seconds, for a quick look

Prints, per device and K: time of each technique, its ratio to plain averaging of the same inputs
in the same run, and peak memory (CUDA max allocated on a GPU); then one OPCM update of the visual
tower against a naive full-SVD loop; then the streamed merge from safetensors files, one child
process per (technique, K), with its peak RSS as a multiple of one model's size. Targets (issue 2):
GPU TIES ≤ 5× averaging; OPCM visual-tower update ≤ 0.3 s on an H100; streamed K = 8 peak RSS
< 3× model size and not above the K = 2 figure by more than noise. `--json PATH` writes all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.merge import OPCM, TECHNIQUES, merge  # noqa: E402
from chronomerge.merge.opcm import is_projected, split_rank  # noqa: E402
from chronomerge.statedict import LazyStateDict  # noqa: E402


def make_states(model: str, k: int, device: str = "cpu"):
    from chronomerge.models import create_model  # open_clip is imported only where models are built

    base = {n: v.detach().to(device) for n, v in create_model(model, seed=0).state_dict().items()}
    experts = []
    for i in range(k):
        g = torch.Generator(device=device).manual_seed(i + 1)
        experts.append({n: v + 0.01 * torch.randn(v.shape, generator=g, device=device, dtype=v.dtype)
                        if v.dtype.is_floating_point else v.clone() for n, v in base.items()})
    return base, experts


def model_bytes(sd) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> tuple[float, int | None]:
    fn()  # warm-up (kernels, allocator)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return best, peak


def bench_techniques(model: str, ks: list[int], device: str, techniques: list[str], repeat: int) -> list[dict]:
    rows = []
    base, experts = make_states(model, max(ks), device)
    for k in ks:
        models = experts[:k]
        avg_t = None
        for name in ["average"] + [t for t in techniques if t != "average"]:
            ms = models[:2] if name == "slerp" else models
            if name == "model_stock" and k < 2:
                continue
            secs, peak = timed(lambda: merge(name, base, ms, device=device, output_device=device), device, repeat)
            avg_t = secs if name == "average" else avg_t
            rows.append({"device": device, "k": len(ms), "technique": name, "seconds": secs,
                         "ratio_to_average": secs / avg_t, "cuda_peak_bytes": peak})
            print(f"{device:5s} K={len(ms)} {name:17s} {secs * 1e3:10.1f} ms  x{secs / avg_t:6.2f} avg"
                  + (f"  peak {peak / 2**30:.2f} GiB" if peak else ""), flush=True)
    return rows


def naive_opcm_step(tau: dict, prev: dict, alpha: float = 0.5) -> None:
    """The straightforward form: full SVD and an explicit (m×m)·X·(n×n) sandwich per weight."""
    for k, d in tau.items():
        if not is_projected(k, tuple(d.shape)):
            continue
        u, s, vh = torch.linalg.svd(prev[k], full_matrices=True)
        r = split_rank(s, alpha)
        coef = u.T @ d @ vh.T
        coef[:r, :] = 0
        coef[:, :r] = 0
        coef.fill_diagonal_(0)
        _ = u @ coef @ vh


def bench_opcm(model: str, device: str, repeat: int, hparams: dict | None = None) -> dict:
    base, experts = make_states(model, 2, device)
    vis = lambda sd: {k: v for k, v in sd.items() if k.startswith("visual.")}  # noqa: E731
    vb, e1, e2 = vis(base), vis(experts[0]), vis(experts[1])
    n_proj = sum(is_projected(k, tuple(v.shape)) for k, v in vb.items())

    def step():
        m = OPCM(vb, device=device, **(hparams or {}))
        m.update(e1)
        t0 = time.perf_counter()
        m.update(e2)
        sync(device)
        return time.perf_counter() - t0

    step()
    secs = min(step() for _ in range(repeat))
    prev = {k: (e1[k] - vb[k]).float() for k in vb}
    tau = {k: (e2[k] - vb[k]).float() for k in vb}
    naive, _ = timed(lambda: naive_opcm_step(tau, prev), device, repeat)
    print(f"{device:5s} OPCM update of the visual tower ({n_proj} projected weights): {secs:.3f} s; "
          f"naive full-SVD loop {naive:.3f} s", flush=True)
    return {"device": device, "opcm_update_seconds": secs, "naive_full_svd_seconds": naive, "projected_weights": n_proj}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    """Run one streamed merge from safetensors files and print its figures as JSON."""
    files = sorted(Path(args.workdir).glob("expert-*.safetensors"))[: args.k]
    base = LazyStateDict.from_file(Path(args.workdir) / "base.safetensors")
    models = [LazyStateDict.from_file(p) for p in files]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()  # the CUDA context's host memory counts before the merge, not in it
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    merge(args.technique, base, models if args.technique != "slerp" else models[:2], device=args.device)
    sync(args.device)
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    print(json.dumps({"technique": args.technique, "k": args.k, "device": args.device, "seconds": secs,
                      "peak_rss_bytes": peak, "rss_before_merge_bytes": rss_before,
                      "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}))


def bench_streamed(model: str, ks: list[int], techniques: list[str], workdir: Path, device: str = "cpu") -> list[dict]:
    base, experts = make_states(model, max(ks))
    size = model_bytes(base)
    save_file(base, workdir / "base.safetensors")
    for i, e in enumerate(experts):
        save_file(e, workdir / f"expert-{i:02d}.safetensors")
    rows = []
    for name in techniques:
        for k in ks:
            out = subprocess.run([sys.executable, __file__, "--child", "--workdir", str(workdir), "--k", str(k),
                                  "--technique", name, "--model", model, "--stream-device", device],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["model_bytes"] = size
            row["peak_rss_over_model"] = row["peak_rss_bytes"] / size
            row["merge_rss_increase_bytes"] = row["peak_rss_bytes"] - row["rss_before_merge_bytes"]
            rows.append(row)
            print(
                f"stream {device} K={k} {name:17s} {row['seconds']:8.2f} s "
                f" peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
                f" = {row['peak_rss_over_model']:.2f}x model ({size / 2**30:.2f} GiB);"
                f" (torch alone {row['rss_before_merge_bytes'] / 2**30:.2f} GiB, merge adds"
                f" {row['merge_rss_increase_bytes'] / size:.2f}x model)"
                + (f"; GPU peak {row['cuda_peak_bytes'] / 2**30:.2f} GiB" if row["cuda_peak_bytes"] else ""),
                flush=True,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--k", type=int, nargs="+", default=[2, 8])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    p.add_argument("--techniques", nargs="+", default=sorted(TECHNIQUES))
    p.add_argument("--stream-techniques", nargs="+", default=["average", "ties", "model_stock"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["techniques", "opcm", "stream"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--stream-device", default="cpu", help="device of the streamed merges (cpu or cuda)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--technique", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.k = args.k[0]
        args.device = args.stream_device
        return child(args)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    results = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "techniques": [], "opcm": [], "stream": []}
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"GPU: {results['gpu']}", flush=True)
    for dev in devices:
        if "techniques" not in args.skip:
            results["techniques"] += bench_techniques(args.model, args.k, dev, args.techniques, args.repeat)
        if "opcm" not in args.skip:
            results["opcm"].append(bench_opcm(args.model, dev, args.repeat))
    if "stream" not in args.skip:
        with tempfile.TemporaryDirectory(dir=args.workdir) as d:
            results["stream"] = bench_streamed(args.model, args.k, args.stream_techniques, Path(d), args.stream_device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
