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
# The Perception Concept Studio's names: YOLO26 from Ultralytics' own yaml.
STUDIO_YOLO_NAMES = ("yolo26n", "yolo26n-seg", "yolo26n-pose")


def make_yolo_checkpoints(
    target: Path, seed: int = 0, names: tuple[str, ...] = YOLO_NAMES
) -> list[Path]:
    import torch
    from ultralytics import YOLO

    torch.manual_seed(seed)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
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


def make_default_checkpoints(target: Path, sam3: bool = True) -> list[Path]:
    """Every model name the infer worker and the Perception Concept Studio use, random weights:
    the YOLO11n trio, SAM 2.1 tiny, Depth Anything V2 Small, RAFT small (ours), the YOLO26n
    trio, Depth Anything V1 Small, RAFT large and SAM 3 (the Studio's: 1.7 GB, 20 s; `sam3`
    False leaves it out)."""
    import subprocess

    from scripts.make_test_weights_depth import V1_FOLDER, make_depth_checkpoint
    from scripts.make_test_weights_raft import make_raft_checkpoint
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint

    paths = make_yolo_checkpoints(target)
    paths.append(make_sam2_checkpoint(target))
    paths.append(make_depth_checkpoint(target))
    paths.append(make_raft_checkpoint(target))
    paths += make_yolo_checkpoints(target, names=STUDIO_YOLO_NAMES)
    paths.append(make_depth_checkpoint(target, folder_name=V1_FOLDER))
    paths.append(make_raft_checkpoint(target, large=True))
    if sam3:  # in a child process: its 4 GB peak leaves with it
        script = Path(__file__).resolve().parent / "make_test_weights_sam3.py"
        subprocess.run([sys.executable, str(script), str(target)], check=True, timeout=900)
        paths.append(target / "sam3.pt")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument(
        "--all",
        action="store_true",
        help="every default and Perception Concept Studio model name, SAM 3 included",
    )
    parser.add_argument("--no-sam3", action="store_true", help="with --all: leave SAM 3 out")
    args = parser.parse_args()
    if args.all:
        paths = make_default_checkpoints(args.target, sam3=not args.no_sam3)
    else:
        paths = make_yolo_checkpoints(args.target)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
