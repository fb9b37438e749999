"""Writes checkpoints of the real architectures with random weights, saved by Ultralytics.

They prove wiring and formats, not accuracy (no pretrained weights can be fetched offline).
Used by the tests, the benchmarks and the image build test:
    python scripts/make_test_weights.py /tmp/weights
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    for path in make_yolo_checkpoints(args.target):
        print(path)


if __name__ == "__main__":
    main()
