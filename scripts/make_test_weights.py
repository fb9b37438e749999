"""Writes checkpoints of the real architectures with random weights, saved by Ultralytics.

They prove wiring and formats, not accuracy (no pretrained weights can be fetched offline).
Used by the tests, the benchmarks and the image build test:
    python scripts/make_test_weights.py /tmp/weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `scripts.*` when run as a file

YOLO_NAMES = ("yolo11n", "yolo11n-seg", "yolo11n-pose")


def make_yolo_checkpoints(target: Path, seed: int = 0) -> list[Path]:
    import torch
    from ultralytics import YOLO

    torch.manual_seed(seed)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in YOLO_NAMES:
        model = YOLO(f"{name}.yaml")
        if name.endswith("-seg"):
            # Untrained mask coefficients give empty masks, which Ultralytics drops with
            # their boxes; positive biases make non-empty masks to check the encodings on.
            head = model.model.model[-1]
            with torch.no_grad():
                head.proto.cv3.bn.bias.fill_(1.0)
                for branch in head.cv4:
                    branch[-1].bias.fill_(1.0)
        path = target / f"{name}.pt"
        model.save(path)
        written.append(path)
    return written


def make_default_checkpoints(target: Path) -> list[Path]:
    """Every default model of the infer worker but SAM 3 (gated, and several GB even random):
    the YOLO trio, SAM 2.1 tiny, Depth Anything V2 Small and RAFT small, random weights."""
    from scripts.make_test_weights_depth import make_depth_checkpoint
    from scripts.make_test_weights_raft import make_raft_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint

    paths = make_yolo_checkpoints(target)
    paths.append(make_sam2_checkpoint(target))
    paths.append(make_depth_checkpoint(target))
    paths.append(make_raft_checkpoint(target))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument(
        "--all",
        action="store_true",
        help="also SAM 2.1 tiny, Depth Anything V2 Small and RAFT small (every default but SAM 3)",
    )
    args = parser.parse_args()
    make = make_default_checkpoints if args.all else make_yolo_checkpoints
    for path in make(args.target):
        print(path)


if __name__ == "__main__":
    main()
