"""Train the tiny synthetic-shapes YOLO11 detector used by tests and the offline demo.

Generates a YOLO-format dataset from :func:`scripts.synthetic_shapes.render_scene` in a
temporary directory, trains a reduced-size YOLO11 detector from scratch on CPU (no
pretrained weights, no network), saves a stripped checkpoint and evaluates it on freshly
rendered held-out scenes, printing one JSON line of metrics per evaluation image size::

    YOLO_OFFLINE=1 YOLO_CONFIG_DIR=/tmp/ultra-cfg python -m scripts.train_shapes_detector

Seeds: training scenes use ``seed * 10_000_000 + 1_000_000 + i``, validation scenes
``... + 2_000_000 + i`` and held-out evaluation scenes ``... + 3_000_000 + i``, so small
seeds (e.g. 0-999_999) never appear in training and are safe for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # before importing ultralytics: never touch the network

import cv2
import numpy as np

if __package__ in (None, ""):  # allow `python scripts/train_shapes_detector.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.synthetic_shapes import CLASS_NAMES, Shape, render_scene

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "weights" / "shapes-yolo11.pt"
IOU_THRESHOLD = 0.7
DEFAULT_SIZE_RANGE = (0.12, 0.40)  # render_scene's default: shape size / short image side
LARGE_SIZE_RANGE = (0.25, 0.70)

# Scene sizes (w, h) used for training/validation; letterboxing maps them all to imgsz.
# The large ones matter: downscaled, their background texture is much smoother, and
# without them the detector hallucinates big squares in flat areas of 1280x720 scenes.
TRAIN_SIZES: tuple[tuple[int, int], ...] = (
    (320, 240),
    (320, 240),
    (384, 288),
    (320, 180),
    (256, 320),
    (288, 288),
    (640, 480),
    (960, 540),
    (1280, 720),
)

# YOLO11 layout (ultralytics cfg/models/11/yolo11.yaml) with a much smaller scale.
MODEL_YAML = """\
# Tiny YOLO11 for the synthetic shapes detector (scripts/train_shapes_detector.py)
nc: {nc}
depth_multiple: {depth}
width_multiple: {width}
reg_max: {reg_max}
backbone:
  - [-1, 1, Conv, [64, 3, 2]] # 0-P1/2
  - [-1, 1, Conv, [128, 3, 2]] # 1-P2/4
  - [-1, 2, C3k2, [256, False, 0.25]]
  - [-1, 1, Conv, [256, 3, 2]] # 3-P3/8
  - [-1, 2, C3k2, [512, False, 0.25]]
  - [-1, 1, Conv, [512, 3, 2]] # 5-P4/16
  - [-1, 2, C3k2, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]] # 7-P5/32
  - [-1, 2, C3k2, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]] # 9
  - [-1, 2, C2PSA, [1024]] # 10
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]] # cat backbone P4
  - [-1, 2, C3k2, [512, False]] # 13
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]] # cat backbone P3
  - [-1, 2, C3k2, [256, False]] # 16 (P3/8-small)
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 13], 1, Concat, [1]] # cat head P4
  - [-1, 2, C3k2, [512, False]] # 19 (P4/16-medium)
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 10], 1, Concat, [1]] # cat head P5
  - [-1, 2, C3k2, [1024, True]] # 22 (P5/32-large)
  - [[16, 19, 22], 1, Detect, [nc]] # Detect(P3, P4, P5)
"""


def _log(message: str) -> None:
    print(f"[train_shapes] {message}", file=sys.stderr, flush=True)


def _disable_font_download() -> None:
    """Ultralytics' dataset check fetches Arial.ttf for plots; skip it (we never plot)."""
    import ultralytics.data.utils as data_utils
    import ultralytics.utils.plotting as plotting

    def _no_font(font: str = "Arial.ttf") -> None:
        return None

    data_utils.check_font = _no_font
    plotting.check_font = _no_font


def _yolo_label_lines(shapes: Sequence[Shape], width: int, height: int) -> list[str]:
    lines = []
    for shape in shapes:
        x1, y1, x2, y2 = shape.box
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{shape.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def write_dataset(
    root: Path, split: str, seeds: Sequence[int], large_fraction: float = 0.0
) -> None:
    """Render ``seeds`` into ``root/images/<split>`` + ``root/labels/<split>`` (YOLO format).

    A ``large_fraction`` of the scenes use ``LARGE_SIZE_RANGE`` so that the detector also
    sees shapes as big (in network-input pixels) as 640x480 scenes predicted at imgsz 640.
    """
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        width, height = TRAIN_SIZES[seed % len(TRAIN_SIZES)]
        large = int((i + 1) * large_fraction) > int(i * large_fraction)  # evenly interleaved
        size_range = LARGE_SIZE_RANGE if large else DEFAULT_SIZE_RANGE
        image, shapes = render_scene(seed, width, height, size_range=size_range)
        cv2.imwrite(str(image_dir / f"{seed}.png"), image)
        (label_dir / f"{seed}.txt").write_text("\n".join(_yolo_label_lines(shapes, width, height)))


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between xyxy boxes ``a`` (N, 4) and ``b`` (M, 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match_scene(
    shapes: Sequence[Shape], boxes: np.ndarray, classes: np.ndarray
) -> tuple[int, list[float]]:
    """Greedy one-to-one matching (same class, IoU >= 0.7); returns (#preds, matched IoUs)."""
    truth = np.array([s.box for s in shapes], dtype=np.float64).reshape(-1, 4)
    iou = _box_iou(truth, boxes.astype(np.float64).reshape(-1, 4))
    same_class = np.array([[s.class_id == int(c) for c in classes] for s in shapes], dtype=bool)
    iou = np.where(same_class.reshape(iou.shape), iou, 0.0)
    matched: list[float] = []
    used_t: set[int] = set()
    used_p: set[int] = set()
    for flat in np.argsort(-iou, axis=None):
        t, p = np.unravel_index(flat, iou.shape)
        if iou[t, p] < IOU_THRESHOLD:
            break
        if t in used_t or p in used_p:
            continue
        used_t.add(int(t))
        used_p.add(int(p))
        matched.append(float(iou[t, p]))
    return len(boxes), matched


def evaluate(
    model: Any, seeds: Sequence[int], width: int, height: int, imgsz: int, conf: float = 0.25
) -> dict[str, Any]:
    """Detection metrics of ``model`` on held-out scenes rendered at ``width`` x ``height``."""
    n_true = n_pred = 0
    ious: list[float] = []
    start = time.perf_counter()
    batch = 16
    for i in range(0, len(seeds), batch):
        scenes = [render_scene(s, width, height) for s in seeds[i : i + batch]]
        results = model.predict(
            [img for img, _ in scenes], imgsz=imgsz, conf=conf, device="cpu", verbose=False
        )
        for (_, shapes), result in zip(scenes, results, strict=True):
            boxes = result.boxes.xyxy.cpu().numpy()
            classes = result.boxes.cls.cpu().numpy()
            preds, matched = match_scene(shapes, boxes, classes)
            n_true += len(shapes)
            n_pred += preds
            ious.extend(matched)
    return {
        "imgsz": imgsz,
        "scene": f"{width}x{height}",
        "scenes": len(seeds),
        "shapes": n_true,
        "predictions": n_pred,
        "recall": round(len(ious) / max(n_true, 1), 4),
        "precision": round(len(ious) / max(n_pred, 1), 4),
        "mean_iou": round(float(np.mean(ious)) if ious else 0.0, 4),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def train(args: argparse.Namespace, workdir: Path) -> tuple[Path, float]:
    """Build the dataset + tiny model yaml in ``workdir``, train, return (best.pt, seconds)."""
    from ultralytics import YOLO

    base = args.seed * 10_000_000
    data_root = workdir / "data"
    start = time.perf_counter()
    train_seeds = range(base + 1_000_000, base + 1_000_000 + args.train_images)
    val_seeds = range(base + 2_000_000, base + 2_000_000 + args.val_images)
    write_dataset(data_root, "train", train_seeds, args.large_fraction)
    write_dataset(data_root, "val", val_seeds, args.large_fraction)
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    data_yaml = workdir / "shapes.yaml"
    data_yaml.write_text(
        f"path: {data_root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    )
    _log(
        f"dataset: {args.train_images} train / {args.val_images} val scenes "
        f"({time.perf_counter() - start:.1f}s)"
    )

    model_yaml = workdir / "shapes-yolo11-tiny.yaml"
    model_yaml.write_text(
        MODEL_YAML.format(
            nc=len(CLASS_NAMES), depth=args.depth, width=args.width, reg_max=args.reg_max
        )
    )
    model = YOLO(str(model_yaml), task="detect")
    start = time.perf_counter()

    def _epoch_end(trainer: Any) -> None:
        if trainer.epoch >= trainer.epochs:  # the final re-validation of best.pt
            return
        metrics = trainer.metrics or {}
        _log(
            f"epoch {trainer.epoch + 1}/{trainer.epochs} "
            f"mAP50={metrics.get('metrics/mAP50(B)', 0.0):.3f} "
            f"mAP50-95={metrics.get('metrics/mAP50-95(B)', 0.0):.3f} "
            f"({time.perf_counter() - start:.0f}s)"
        )

    model.add_callback("on_fit_epoch_end", _epoch_end)
    model.train(
        data=str(data_yaml),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        nbs=args.nbs or args.batch,  # nominal batch = batch: an optimizer step every batch
        device="cpu",
        workers=args.workers,
        amp=False,  # no AMP check (it would fetch yolo11n.pt)
        plots=False,  # no plots (they would fetch Arial.ttf)
        val=True,
        cache="disk",  # cache="ram" is flagged as non-deterministic by ultralytics
        seed=args.seed,
        deterministic=True,
        project=str(workdir / "runs"),
        name="train",
        exist_ok=True,
        optimizer=args.optimizer,
        lr0=args.lr0,
        mosaic=args.mosaic,
        close_mosaic=args.close_mosaic,
        scale=args.scale,
        cls=args.cls,
        patience=args.epochs,
        verbose=False,
    )
    seconds = time.perf_counter() - start
    best = workdir / "runs" / "train" / "weights" / "best.pt"
    return best, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint path")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--nbs", type=int, default=0, help="nominal batch size (default: --batch, no accumulation)"
    )
    parser.add_argument("--cls", type=float, default=0.5, help="classification loss gain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=float, default=0.25, help="YOLO depth multiple")
    parser.add_argument("--width", type=float, default=0.125, help="YOLO width multiple")
    parser.add_argument("--reg-max", type=int, default=16, help="DFL bins of the Detect head")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--optimizer", default="AdamW")
    parser.add_argument("--lr0", type=float, default=0.003)
    parser.add_argument("--mosaic", type=float, default=1.0)
    parser.add_argument("--close-mosaic", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.5, help="random scale augmentation")
    parser.add_argument("--eval-images", type=int, default=200, help="held-out scenes per size")
    parser.add_argument(
        "--large-fraction", type=float, default=0.5, help="share of scenes with large shapes"
    )
    parser.add_argument(
        "--eval",
        nargs="*",
        default=["320@320x240", "640@640x480", "640@1280x720"],
        metavar="IMGSZ@WxH",
        help="held-out evaluations: predict at IMGSZ on W x H scenes",
    )
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --out")
    parser.add_argument("--verbose", action="store_true", help="full ultralytics logging")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dataset/runs")
    args = parser.parse_args(argv)

    if not args.verbose:  # before the first ultralytics import: silence its per-batch logging
        os.environ.setdefault("YOLO_VERBOSE", "False")
    _disable_font_download()
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import strip_optimizer

    out: Path = args.out.resolve()
    train_seconds = None
    if not args.eval_only:
        workdir = Path(tempfile.mkdtemp(prefix="shapes-yolo-"))
        try:
            best, train_seconds = train(args, workdir)
            out.parent.mkdir(parents=True, exist_ok=True)
            strip_optimizer(best, s=str(out))
        finally:
            if args.keep_workdir:
                _log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        _log(f"saved {out} ({out.stat().st_size} bytes) after {train_seconds:.0f}s of training")

    model = YOLO(str(out), task="detect")
    expected = dict(enumerate(CLASS_NAMES))
    if model.names != expected:
        raise SystemExit(f"unexpected class names {model.names} != {expected}")
    base = args.seed * 10_000_000 + 3_000_000
    for spec in args.eval:
        imgsz_text, _, scene = spec.partition("@")
        imgsz = int(imgsz_text)
        width, height = (int(v) for v in scene.lower().split("x"))
        seeds = range(base + width * 1000, base + width * 1000 + args.eval_images)
        metrics = evaluate(model, seeds, width, height, imgsz)
        metrics["train_seconds"] = None if train_seconds is None else round(train_seconds, 1)
        metrics["checkpoint_bytes"] = out.stat().st_size
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
