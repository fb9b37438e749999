"""Every CUDA path of both workers, on one GPU, in a few minutes; prints one JSON line per check.

    python scripts/gpu_check.py [--steps 300] [--views 24] [--train-side 160] [--only NAME ...]
    scripts/gpu_check.sh          # the same with the project's venv, under an 8-minute limit

Checks (``status``: ``ok``, ``failed`` (with ``error``) or ``skipped`` (with ``reason``)):

* ``environment``: torch and its CUDA build, the GPU, pycolmap's CUDA build, gsplat's kernels.
* ``sift_gpu``: SIFT extraction and matching on the GPU (pycolmap-cuda12, which the splat
  image installs) against the CPU on the synthetic orbit (tests/splat_scene.py): times and
  registered frames.
* ``gsplat_training``: the splat trainer on CUDA (gsplat's rasterizer) and on the CPU (our
  PyTorch rasterizer) from the same SfM points for the same steps: held-out PSNR of each
  (they must agree within ``--psnr-tolerance`` dB), steps per second, CUDA peak memory.
* ``yolo_fp16``, ``sam2_fp16``, ``sam3_fp16``: one infer job each through the worker's own
  runner on random-weight checkpoints (scripts/make_test_weights*.py) with DEVICE=cuda and
  HALF_PRECISION on: no error, the expected result shape, time and CUDA peak memory.

Without a usable GPU each CUDA check is ``skipped`` with the reason and the script exits 0;
it exits 1 when a check that ran failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHECKS = ("sift_gpu", "gsplat_training", "yolo_fp16", "sam2_fp16", "sam3_fp16", "orbit_job")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None."""
    import torch

    if not torch.cuda.is_available():
        return (
            f"no usable CUDA GPU (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}: torch.cuda.is_available() is False)"
        )
    return None


def environment() -> dict[str, Any]:
    import importlib.util

    import pycolmap
    import torch

    record: dict[str, Any] = {
        "check": "environment",
        "status": "ok",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "pycolmap": pycolmap.__version__,
        "pycolmap_cuda": bool(pycolmap.has_cuda),
        "gsplat_kernels": importlib.util.find_spec("gsplat.csrc") is not None,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            arch_list=torch.cuda.get_arch_list(),
        )
    return record


class Scene:
    """The synthetic orbit as image files, rendered once and shared by the splat checks."""

    def __init__(self, root: Path, views: int) -> None:
        self.root, self.views = root, views
        self.images = root / "images"
        self._pinhole: Any = None

    def _render(self) -> None:  # on first use: a skipped check costs nothing
        import cv2

        from tests.splat_scene import render_views

        if self.images.exists():
            return
        self.images.mkdir(parents=True)
        pictures, _k, _poses, _scene = render_views(self.views, seed=0)
        for i, pixels in enumerate(pictures):
            cv2.imwrite(str(self.images / f"frame_{i:05d}.png"), pixels)

    def sfm(self, gpu: bool, tag: str) -> Any:
        from core.splat.sfm import run_sfm

        self._render()
        return run_sfm(
            self.images, self.root / f"sfm-{tag}", use_gpu=gpu, max_features=4096, mapper="auto"
        )

    def pinhole(self) -> Any:
        from core.splat.sfm import undistort_to_pinhole

        if self._pinhole is None:
            self._pinhole = undistort_to_pinhole(
                self.sfm(gpu=False, tag="train"), self.images, self.root / "undistorted"
            )
        return self._pinhole


def check_sift_gpu_build() -> str:
    import pycolmap

    if pycolmap.has_cuda:
        return f"pycolmap {pycolmap.__version__} is built with CUDA"
    return (
        f"pycolmap {pycolmap.__version__} is built without CUDA (the splat image installs "
        f"pycolmap-cuda12=={pycolmap.__version__}; elsewhere pip install it in place of pycolmap)"
    )


def check_sift_gpu(scene: Scene, args: argparse.Namespace) -> dict[str, Any]:
    import pycolmap

    if not pycolmap.has_cuda:
        return {"status": "skipped", "reason": check_sift_gpu_build()}
    runs = {}
    for name, gpu in (("gpu", True), ("cpu", False)):
        result = scene.sfm(gpu=gpu, tag=f"sift-{name}")
        runs[name] = {
            "extract_ms": result.timings_ms["extract"],
            "match_ms": result.timings_ms["match"],
            "registered": result.num_registered,
            "total": result.total_images,
            "points": result.num_points,
        }
    ok = runs["gpu"]["registered"] >= 0.9 * runs["gpu"]["total"]
    if not ok:
        return {"status": "failed", "error": "GPU SIFT registered under 90 % of the frames", **runs}
    return {"status": "ok", **runs}


def _train_once(pinhole: Any, scene: Scene, device: str, args: argparse.Namespace) -> Any:
    from core.splat.train import Gaussians, TrainConfig, load_training_views, train

    views = load_training_views(pinhole, scene.root / "undistorted" / "images", args.train_side)
    gaussians = Gaussians.init_from_points(pinhole.points_xyz, pinhole.points_rgb, 3)
    config = TrainConfig(
        iterations=args.steps, max_gaussians=args.cap, sh_degree=3, device=device, seed=0
    )
    return train(gaussians, views, config)


def check_gsplat_training(scene: Scene, args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    import torch

    problem = cuda_problem()
    if problem:
        return {"status": "skipped", "reason": problem}
    if importlib.util.find_spec("gsplat.csrc") is None:
        # gsplat would JIT-compile its kernels for minutes; the image compiles them at build.
        return {"status": "skipped", "reason": "gsplat's CUDA kernels (gsplat.csrc) are not built"}
    pinhole = scene.pinhole()
    torch.cuda.reset_peak_memory_stats()
    cuda = _train_once(pinhole, scene, "cuda", args)
    peak = torch.cuda.max_memory_allocated() / 2**20
    cpu = _train_once(pinhole, scene, "cpu", args)
    record: dict[str, Any] = {"steps": args.steps, "train_side": args.train_side}
    for name, run in (("cuda", cuda), ("cpu", cpu)):
        seconds = run.timings_ms["train"] / 1000
        record[name] = {
            "psnr_start": round(run.psnr_start, 3),
            "psnr": round(run.psnr_end, 3),
            "ssim": round(run.ssim_end, 4),
            "it_per_s": round(run.steps / seconds, 2),
            "gaussians": run.num_gaussians,
        }
    record["cuda"]["peak_memory_mib"] = round(peak, 1)
    gap = abs(cuda.psnr_end - cpu.psnr_end)
    record["psnr_gap_db"] = round(gap, 3)
    learned = cuda.psnr_end > cuda.psnr_start + 1.0
    if gap <= args.psnr_tolerance and learned:
        return {"status": "ok", **record}
    why = "did not learn (PSNR +1 dB)" if not learned else f"PSNR gap over {args.psnr_tolerance}"
    return {"status": "failed", "error": f"CUDA training {why}", **record}


def _png_b64(pixels: Any) -> str:
    import cv2

    ok, buffer = cv2.imencode(".png", pixels)
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def _test_image() -> Any:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    image = np.full((480, 640, 3), 110, np.uint8) + rng.integers(0, 30, (480, 640, 3), np.uint8)
    cv2.circle(image, (213, 240), 96, (20, 40, 220), -1)
    cv2.rectangle(image, (320, 120), (470, 240), (200, 180, 30), -1)
    return image


class Infer:
    """The infer worker's own runner in this process, on CUDA with half precision, reading
    random-weight checkpoints from a folder of its own."""

    def __init__(self, weights: Path) -> None:
        self.weights = weights
        os.environ.update(
            WEIGHTS_DIR=str(weights),
            VOLUME_WEIGHTS_DIR=str(weights / "no-volume"),
            ALLOW_MODEL_DOWNLOADS="false",
            DEVICE="cuda",
            HALF_PRECISION="true",
            YOLO_OFFLINE="1",
        )
        os.environ.pop("RESULT_PATH", None)
        import core.models
        from core.config import get_settings

        get_settings.cache_clear()
        core.models._registry = None
        core.models.worker_device.cache_clear()

    def job(self, job_input: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        import core.apps

        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = core.apps.run_infer({"id": "gpu-check", "input": job_input})
        stats = {
            "job_s": round(time.perf_counter() - t0, 2),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "device": result.get("device"),
        }
        return result, stats


def _infer_record(result: dict[str, Any], stats: dict[str, Any], ok: bool) -> dict[str, Any]:
    if "error" in result:
        return {"status": "failed", "error": f"{result.get('error_code')}: {result['error']}"}
    if not ok:
        return {"status": "failed", "error": "unexpected result shape", **stats}
    return {"status": "ok", **stats}


def _detections(result: dict[str, Any]) -> list[Any] | None:
    results = result.get("results")
    if isinstance(results, list) and results and isinstance(results[0], dict):
        found = results[0].get("detections")
        return found if isinstance(found, list) else None
    return None


def check_yolo_fp16(infer: Infer, args: argparse.Namespace) -> dict[str, Any]:
    problem = cuda_problem()
    if problem:
        return {"status": "skipped", "reason": problem}
    from scripts.make_test_weights import make_yolo_checkpoints

    make_yolo_checkpoints(infer.weights)
    image = _png_b64(_test_image())
    records = {}
    for task, model in (("object-detection", "yolo11n.pt"), ("instance-segmentation",
                        "yolo11n-seg.pt"), ("pose-estimation", "yolo11n-pose.pt")):  # fmt: skip
        result, stats = infer.job(
            {"task": task, "model": model, "image": image, "options": {"threshold": 0.0}}
        )
        record = _infer_record(result, stats, _detections(result) is not None)
        if record["status"] != "ok":
            return {**record, "task": task}
        records[task] = stats
    return {"status": "ok", **records}


def check_sam2_fp16(infer: Infer, args: argparse.Namespace) -> dict[str, Any]:
    problem = cuda_problem()
    if problem:
        return {"status": "skipped", "reason": problem}
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint

    make_sam2_checkpoint(infer.weights)
    objects = [{"id": 1, "points": [[213, 240]], "labels": [1]}]
    result, stats = infer.job(
        {
            "task": "sam2-segmentation",
            "image": _png_b64(_test_image()),
            "options": {"objects": objects, "mask_format": "rle"},
        }
    )
    return _infer_record(result, stats, isinstance(result.get("results"), list))


def check_sam3_fp16(infer: Infer, args: argparse.Namespace) -> dict[str, Any]:
    problem = cuda_problem()
    if problem:
        return {"status": "skipped", "reason": problem}
    # In a child process, as make_test_weights.py does: its 4 GB peak leaves with it.
    script = REPO / "scripts" / "make_test_weights_sam3.py"
    subprocess.run([sys.executable, str(script), str(infer.weights)], check=True, timeout=300)
    result, stats = infer.job(
        {
            "task": "sam3-concept-segmentation",
            "image": _png_b64(_test_image()),
            "options": {"text_prompt": ["person", "bicycle"], "threshold": 0.0},
        }
    )
    return _infer_record(result, stats, _detections(result) is not None)


def check_orbit_job(infer: Infer, args: argparse.Namespace) -> dict[str, Any]:
    """Orbit's five stages on CUDA: SAM 2 in fp16, Depth Anything, GPU SIFT when pycolmap has
    it, on a rendered 16-frame clip with its true camera path (the solve's error is reported;
    SAM 2's random weights make random masks, so the mode is whatever the gates say)."""
    problem = cuda_problem()
    if problem:
        return {"status": "skipped", "reason": problem}
    import base64

    import numpy as np

    from scripts.make_test_weights_depth import make_depth_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint
    from tests.orbit_scene import orbit_clip
    from tests.splat_scene import encode_mp4

    make_sam2_checkpoint(infer.weights, "sam2.1_hiera_tiny.pt")
    if not (infer.weights / "depth-anything-v2-small").exists():
        make_depth_checkpoint(infer.weights)
    os.environ["ORBIT_SAM2_MODEL"] = "sam2.1_hiera_tiny.pt"
    clip = orbit_clip(16, width=320, height=240, arc_deg=60.0, with_background=False)
    video = encode_mp4(clip.frames, infer.weights / "orbit.mp4", fps=12.0, crf=10)
    centre = np.argwhere(clip.masks[0]).mean(axis=0)
    result, stats = infer.job(
        {
            "video": base64.b64encode(video.read_bytes()).decode(),
            "target_fps": 12,
            "prompt_points": [{"x": float(centre[1]), "y": float(centre[0])}],
        }
    )
    record = _infer_record(result, stats, result.get("frame_count") == 16)
    if record["status"] == "ok":
        timings = result.get("timings_ms", {})
        record["stages_ms"] = {k: timings.get(k) for k in ("segmentation", "pose-estimation",
                               "depth-estimation", "tracking")}  # fmt: skip
        record["mode"] = result.get("mode")
        record["registered"] = result["quality"]["pose"].get("registered")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps, each device")
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--train-side", type=int, default=160)
    parser.add_argument("--cap", type=int, default=5_000, help="max_gaussians (CPU run too)")
    parser.add_argument("--psnr-tolerance", type=float, default=1.5)
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    emit(environment())
    problem = cuda_problem()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        scene: Scene | None = None
        infer: Infer | None = None
        for name in args.only:
            t0 = time.perf_counter()
            try:
                if problem:  # every check here needs the GPU
                    record: dict[str, Any] = {"status": "skipped", "reason": problem}
                    if name == "sift_gpu":
                        record["also"] = check_sift_gpu_build()
                elif name in ("sift_gpu", "gsplat_training"):
                    if scene is None:
                        scene = Scene(root / "scene", args.views)
                    check: Callable[[Any, argparse.Namespace], dict[str, Any]] = {
                        "sift_gpu": check_sift_gpu,
                        "gsplat_training": check_gsplat_training,
                    }[name]
                    record = check(scene, args)
                else:
                    if infer is None:
                        infer = Infer(root / "weights")
                    check = {
                        "yolo_fp16": check_yolo_fp16,
                        "sam2_fp16": check_sam2_fp16,
                        "sam3_fp16": check_sam3_fp16,
                        "orbit_job": check_orbit_job,
                    }[name]
                    record = check(infer, args)
            except Exception as exc:  # one broken path must not hide the others' results
                record = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            failed += record["status"] == "failed"
            emit({"check": name, **record, "seconds": round(time.perf_counter() - t0, 2)})
    statuses = {"failed": failed, "seconds": round(time.perf_counter() - started, 1)}
    emit({"check": "summary", "status": "failed" if failed else "ok", **statuses})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
