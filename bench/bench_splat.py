"""Splat job stage timings on the synthetic orbit scene (CPU here): JSON lines.

    python bench/bench_splat.py [--iterations 400] [--train-max-side 160]

Runs the whole job in-process as the worker does (examples/splat/test_input.json's video,
artifacts to a temporary OUTPUT_DIR), then prints the timings per stage, the SfM and training
statistics and the bytes per Gaussian of each artifact format. Target: whole job <= 300 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--train-max-side", type=int, default=160)
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="bench-splat-")
    os.environ["OUTPUT_DIR"] = out
    from core.splat.pipeline import run_splat_job

    job = json.loads((REPO / "examples" / "splat" / "test_input.json").read_text())
    job["input"].update(
        iterations=args.iterations,
        train_max_side=args.train_max_side,
        formats=["ply", "splat", "ply_compressed"],
    )
    job["id"] = "bench"
    result = run_splat_job(job, sink=lambda job, update: None)
    if "error" in result:
        raise SystemExit(result["error"])
    print(
        json.dumps(
            {
                "bench": "splat_job_stages",
                "device": result["device"],
                "timings_ms": result["timings_ms"],
                "target_total_ms": 300_000,
            }
        )
    )
    print(
        json.dumps(
            {"bench": "splat_job_quality", "sfm": result["sfm"], "training": result["training"]}
        )
    )
    gaussians = result["training"]["gaussians"]
    sizes = {
        a["name"]: round(a["bytes"] / gaussians, 2)
        for a in result["artifacts"]
        if a["name"].endswith((".ply", ".splat"))
    }
    print(json.dumps({"bench": "splat_bytes_per_gaussian", "gaussians": gaussians, **sizes}))


if __name__ == "__main__":
    main()
