"""SAM image encoder at 1024 px, segment-anything's attention vs msmedcap's SDPA path (issue 20, item 3):
peak memory per image, time, and the largest output difference.

    python -m msmedcap.bench.sam_attention [--type vit_b] [--images 2] [--threads 2] [--out FILE.json]

Each implementation runs in a fresh subprocess (``--worker``): segment-anything's registry encoder
(``sam_model_registry[type](checkpoint=None).image_encoder``, random weights with random rel-pos tables,
fp32, CPU), one untimed forward, then ``--iters`` timed forwards of the same ``--images`` images.
Peak memory: the kernel's resident-set high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` after the untimed forward, so the figure is the timed forwards' peak resident
set minus the resident set just before them (model, input and libraries excluded). The workers run with
``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so glibc maps every tensor of 1 MiB or more on its own and
unmaps it when freed: the resident set follows the live tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

IMPLS = ("stock", "sdpa")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> dict:
    import torch

    from segment_anything import sam_model_registry

    from msmedcap.models import sam_patches

    torch.set_num_threads(args.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = sam_model_registry[args.type](checkpoint=None).image_encoder.eval()
        with torch.no_grad():  # registry rel-pos tables are zeros: random ones so the bias matters
            for name, p in encoder.named_parameters():
                if "rel_pos" in name:
                    p.normal_(0, 0.5)
        images = torch.randn(args.images, 3, encoder.img_size, encoder.img_size)
    if args.impl == "sdpa":
        sam_patches.install(encoder)
    with torch.no_grad():
        encoder(images)  # untimed: one-time allocations (thread pools, kernels' scratch)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set
        before = _status_kib("VmRSS")
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            out = encoder(images)
            times.append(time.perf_counter() - t)
        peak = _status_kib("VmHWM")
    torch.save(out, Path(args.out_dir, f"{args.impl}.pt"))
    return {"impl": args.impl, "images": args.images, "threads": args.threads, "seconds": min(times),
            "seconds_all": times, "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
            "peak_increase_mib": (peak - before) / 1024, "bias_elements": sam_patches.BIAS_ELEMENTS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=2, help="timed forwards (the fastest is reported)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of stock,sdpa")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        impls = [i for i in IMPLS if i in args.impls.split(",")]
        for impl in impls:  # one at a time, each in a fresh process
            cmd = [sys.executable, "-m", "msmedcap.bench.sam_attention", "--worker", "--impl", impl, "--type",
                   args.type, "--images", str(args.images), "--threads", str(args.threads), "--iters",
                   str(args.iters), "--out-dir", tmp]
            # a fixed mmap threshold: glibc otherwise raises it as blocks are freed (up to 32 MiB) and keeps
            # freed tensors of the untimed forward resident, counted in the "before" resident set
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        outs = {i: torch.load(Path(tmp, f"{i}.pt")) for i in impls}
    from msmedcap.bench.common import device_name

    result = {"type": args.type, "image_size": 1024, "dtype": "fp32", "device": "cpu", "rows": rows,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "segment_anything": metadata.version("segment_anything"),
                           "cpu": device_name(torch.device("cpu")), "cores": os.cpu_count()},
              "command": " ".join(["python -m msmedcap.bench.sam_attention", *(argv or sys.argv[1:])])}
    print("| attention | peak MiB (all images) | peak MiB per image | s per forward | s per image |")
    print("|---|---|---|---|---|")
    for impl, r in rows.items():
        n = r["images"]
        print(f"| {impl} | {r['peak_increase_mib']:.0f} | {r['peak_increase_mib'] / n:.0f} | {r['seconds']:.2f} | "
              f"{r['seconds'] / n:.2f} |")
    if len(outs) == 2:
        ref, diff = outs["stock"], (outs["sdpa"] - outs["stock"]).abs()
        result.update(max_abs_diff=diff.max().item(), max_rel_diff=(diff.max() / ref.abs().max()).item(),
                      mean_abs_diff=diff.mean().item(), output_abs_mean=ref.abs().mean().item(),
                      output_abs_max=ref.abs().max().item())
        print(f"max |sdpa - stock| = {result['max_abs_diff']:.3g} (output |max| {result['output_abs_max']:.3g}, "
              f"relative to it {result['max_rel_diff']:.3g}); mean |diff| {result['mean_abs_diff']:.3g} "
              f"(output mean |x| {result['output_abs_mean']:.3g})")
    print(json.dumps(result["versions"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
