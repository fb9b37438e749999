"""Writes a random-weight torchvision `raft_small` (or `raft_large`) checkpoint, in the format
WEIGHTS_DIR holds for it: a plain state dict saved with `torch.save`, like torchvision's own.

It proves wiring (loading, padding, shapes), not accuracy: the flow it gives is meaningless.
    python scripts/make_test_weights_raft.py /tmp/weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # allow `python scripts/make_test_weights_raft.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RAFT_FILE = "raft_small.pth"
RAFT_LARGE_FILE = "raft_large.pth"  # the Perception Concept Studio's `raft-large`


def make_raft_checkpoint(target: Path, seed: int = 0, large: bool = False) -> Path:
    import torch
    from torchvision.models import optical_flow

    torch.manual_seed(seed)
    target.mkdir(parents=True, exist_ok=True)
    path = target / (RAFT_LARGE_FILE if large else RAFT_FILE)
    build = optical_flow.raft_large if large else optical_flow.raft_small
    torch.save(build(weights=None, progress=False).state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument("--large", action="store_true", help="raft_large.pth instead")
    args = parser.parse_args()
    print(make_raft_checkpoint(args.target, large=args.large))


if __name__ == "__main__":
    main()
