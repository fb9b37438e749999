"""Benchmark of the CPU 3DGS rasterizer and the splat file formats; prints JSON lines.

    python bench/bench_rasterizer.py [--sizes 10000 100000] [--res 256] [--repeats 3]
                                     [--threads N] [--log-scale -4.5]

Scene: Gaussians uniform in a 4 x 4 x 2 box 3-5 units in front of a camera with focal
length = image width (the box fills the view), log-scales U(-5.5, -3.5) by default (radius
about 4 px; ``--log-scale`` shifts the range), opacity U(0.1, 0.9), SH degree 3.
Each repeat is one forward (render) and one backward of ``img.sum()`` w.r.t. all parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.splat.export import (
    encode_splat,
    write_compressed_ply,
    write_ply,
    write_rgb_ply,
)
from core.splat.rasterize import rasterization


def _scene(n: int, log_scale: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # x, y in [-2, 2], z in [3, 5]: fills the 90 degree field of view at z = 4
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([2.0, 2.0, 1.0])
    means = means + torch.tensor([0.0, 0.0, 4.0])
    quats = torch.randn(n, 4, generator=g)
    log_scales = torch.rand(n, 3, generator=g) * 2 - 1 + log_scale
    logit_op = torch.logit(torch.rand(n, generator=g) * 0.8 + 0.1)
    sh = torch.randn(n, 16, 3, generator=g) * 0.3
    return [t.requires_grad_() for t in (means, quats, log_scales, logit_op, sh)]


def bench_render(n: int, res: int, repeats: int, log_scale: float) -> dict:
    means, quats, log_scales, logit_op, sh = _scene(n, log_scale)
    K = torch.tensor([[float(res), 0, res / 2], [0, float(res), res / 2], [0, 0, 1]])
    viewmat = torch.eye(4)
    fwd, bwd = [], []
    for i in range(repeats + 1):  # first run is a warm-up
        for p in (means, quats, log_scales, logit_op, sh):
            p.grad = None
        t0 = time.perf_counter()
        img, alpha, meta = rasterization(
            means,
            quats,
            log_scales.exp(),
            torch.sigmoid(logit_op),
            sh,
            viewmat,
            K,
            res,
            res,
            sh_degree=3,
        )
        t1 = time.perf_counter()
        img.sum().backward()
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    visible = int((meta["radii"] > 0).all(-1).sum())
    return {
        "bench": "cpu_rasterizer_fwd_bwd",
        "n_gaussians": n,
        "width": res,
        "height": res,
        "sh_degree": 3,
        "log_scale_mean": log_scale,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "forward_s_median": round(statistics.median(fwd), 4),
        "backward_s_median": round(statistics.median(bwd), 4),
        "total_s_median": round(statistics.median(f + b for f, b in zip(fwd, bwd, strict=True)), 4),
        "visible": visible,
        "n_isects": int(meta["n_isects"]),
        "mean_alpha": round(float(alpha.detach().mean()), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bench_formats(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    base = {
        "means": rng.normal(size=(n, 3)).astype(np.float32),
        "scales_log": rng.normal(-4, 1, size=(n, 3)).astype(np.float32),
        "quats": rng.normal(size=(n, 4)).astype(np.float32),
        "opacity_logit": rng.normal(size=n).astype(np.float32),
        "sh_dc": rng.normal(size=(n, 3)).astype(np.float32),
    }
    rest3 = (rng.normal(size=(n, 15, 3)) * 0.1).astype(np.float32)
    out = []

    def row(fmt: str, sh_degree: int | None, size: int) -> dict:
        return {
            "bench": "export_size",
            "format": fmt,
            "sh_degree": sh_degree,
            "n_gaussians": n,
            "bytes": size,
            "bytes_per_gaussian": round(size / n, 3),
        }

    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        write_ply(p / "sh3.ply", **base, sh_rest=rest3)
        out.append(row("ply", 3, (p / "sh3.ply").stat().st_size))
        write_ply(p / "sh0.ply", **base)
        out.append(row("ply", 0, (p / "sh0.ply").stat().st_size))
        out.append(row("splat", 0, len(encode_splat(**base))))
        write_compressed_ply(p / "c3.ply", **base, sh_rest=rest3, min_opacity=0.0)
        out.append(row("compressed_ply", 3, (p / "c3.ply").stat().st_size))
        write_compressed_ply(p / "c0.ply", **base, min_opacity=0.0)
        out.append(row("compressed_ply", 0, (p / "c0.ply").stat().st_size))
        rgb = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
        write_rgb_ply(p / "rgb.ply", base["means"], rgb)
        out.append(row("rgb_ply", None, (p / "rgb.ply").stat().st_size))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--log-scale", type=float, default=-4.5, help="mean log-scale (-4.5: ~4 px radius)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bench": "baseline", "rss_after_imports_mb": round(base_rss, 1)}))
    for n in args.sizes:
        print(json.dumps(bench_render(n, args.res, args.repeats, args.log_scale)), flush=True)
    for r in bench_formats(100_000):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
