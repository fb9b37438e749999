"""Benchmark of CPU Gaussian-splat training on the synthetic scene; prints JSON lines.

    python bench/bench_splat_train.py [--views 24] [--width 320] [--height 240]
                                      [--train-side 160] [--steps 500] [--cap 3000]
                                      [--threads 1] [--densify on off] [--seed 0]

Scene: tests/splat_scene.py (textured boxes on a textured ground, f = 0.875 x width, views
on an orbit), the test scale of tests/test_splat_train.py by default. The views go through
real SfM (pycolmap, exhaustive matching up to 40 views) and undistortion, then
``core.splat.train`` trains from the SfM points on ``--train-side`` copies, every 8th view
held out. One line for the scene + SfM, then one per (threads, densify) run: steps/s, ms per
step, held-out PSNR / SSIM before and after, Gaussians before and after, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.splat.frames import write_frames
from core.splat.sfm import run_sfm, undistort_to_pinhole
from core.splat.train import Gaussians, TrainConfig, load_training_views, train
from tests.splat_scene import render_views


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--train-side", type=int, default=160)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--cap", type=int, default=3000, help="max_gaussians")
    parser.add_argument("--sh-degree", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--densify", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--sfm-threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        images, _k, _poses, _scene = render_views(
            args.views, width=args.width, height=args.height, focal=0.875 * args.width, seed=0
        )
        t1 = time.perf_counter()
        write_frames(images, root / "images")
        sfm = run_sfm(
            root / "images", root / "work", max_features=4096, num_threads=args.sfm_threads
        )
        pinhole = undistort_to_pinhole(
            sfm, root / "images", root / "undistorted", num_threads=args.sfm_threads
        )
        t2 = time.perf_counter()
        views = load_training_views(pinhole, root / "undistorted" / "images", args.train_side)
        _emit(
            {
                "step": "scene",
                "views": args.views,
                "size": [args.width, args.height],
                "train_size": [views[0].width, views[0].height],
                "render_s": round(t1 - t0, 2),
                "sfm_s": round(t2 - t1, 2),
                **pinhole.stats(),
            }
        )

        for threads in args.threads:
            for densify in args.densify:
                gaussians = Gaussians.init_from_points(
                    pinhole.points_xyz, pinhole.points_rgb, args.sh_degree
                )
                config = TrainConfig(
                    iterations=args.steps,
                    max_gaussians=args.cap,
                    sh_degree=args.sh_degree,
                    densify=densify == "on",
                    threads=threads,
                    seed=args.seed,
                )
                result = train(gaussians, views, config)
                train_s = result.timings_ms["train"] / 1000
                _emit(
                    {
                        "step": "train",
                        "device": result.device,
                        "threads": threads,
                        "densify": densify,
                        "densification": result.densification,
                        "steps": result.steps,
                        "steps_per_s": round(result.steps / train_s, 2),
                        "ms_per_step": round(1000 * train_s / result.steps, 1),
                        "psnr_start": round(result.psnr_start, 2),
                        "psnr_end": round(result.psnr_end, 2),
                        "ssim_start": round(result.ssim_start, 3),
                        "ssim_end": round(result.ssim_end, 3),
                        "gaussians_start": gaussians.num,
                        "gaussians_end": result.num_gaussians,
                        "train_views": result.num_train_views,
                        "eval_views": result.num_eval_views,
                        "timings_ms": result.timings_ms,
                        "peak_rss_mb": round(
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                        ),
                    }
                )


if __name__ == "__main__":
    main()
