"""Latency per image at 640x480 of every infer task, side by side in one run (JSON lines).

Random-weight checkpoints of the real architectures (made here, loaded through WEIGHTS_DIR):
the compute is that of the real models, the outputs are not. SAM 3 only with `--sam3`
(minutes per image on a CPU, and a 1.7 GB checkpoint to make).

    python bench/bench_tasks.py [--repeats 5] [--sam3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "false")

JOBS: dict[str, dict] = {
    "object-detection": {},
    "image-segmentation": {"options": {"mask_format": "rle"}},
    "pose-estimation": {},
    "sam2-segmentation": {"options": {"points": [[200, 240]]}},
    "depth-estimation": {},
    "velocity-estimation": {},  # video only: measured in bench_video.py
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sam3", action="store_true", help="also SAM 3 (slow on CPU)")
    args = parser.parse_args()

    weights = Path(tempfile.mkdtemp(prefix="bench-tasks-weights-"))
    os.environ.update(
        WEIGHTS_DIR=str(weights), ALLOW_MODEL_DOWNLOADS="false", YOLO_CONFIG_DIR=str(weights)
    )
    from scripts.make_test_weights import make_default_checkpoints

    make_default_checkpoints(weights, sam3=False)
    jobs = {name: job for name, job in JOBS.items() if name != "velocity-estimation"}
    if args.sam3:
        from scripts.make_test_weights_sam3 import make_sam3_checkpoint

        make_sam3_checkpoint(weights)
        jobs["sam3-concept-segmentation"] = {"options": {"text_prompt": "person, bicycle"}}

    import torch

    from core.apps import run_infer as run_infer_job
    from tests.conftest import jpeg_b64, scene_image

    # A new image each time: SAM 2 would otherwise reuse its cached image embedding.
    images = [jpeg_b64(scene_image(640, 480, seed=seed)) for seed in range(args.repeats + 1)]
    for task, extra in jobs.items():

        def job(index: int, task: str = task, extra: dict = extra) -> dict:
            return {"id": "bench", "input": {"task": task, "image": images[index], **extra}}

        first_started = time.perf_counter()
        result = run_infer_job(job(0))  # loads and warms the model
        first_ms = (time.perf_counter() - first_started) * 1000
        if "error" in result:
            raise SystemExit(f"{task}: {result['error']}")
        times = []
        for index in range(1, args.repeats + 1):
            started = time.perf_counter()
            run_infer_job(job(index))
            times.append((time.perf_counter() - started) * 1000)
        line = {
            "bench": "task_latency_640",
            "task": task,
            "model": result.get("model"),
            "image": "640x480 jpeg base64",
            "median_ms": round(statistics.median(times), 1),
            "min_ms": round(min(times), 1),
            "first_job_ms": round(first_ms, 1),
            "repeats": args.repeats,
            "device": result.get("device"),
            "torch_threads": torch.get_num_threads(),
            "weights": "random (same architecture)",
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
