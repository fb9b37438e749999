"""Writes a random-weight torchvision `raft_small` checkpoint, in the format WEIGHTS_DIR holds
for it: a plain state dict saved with `torch.save`, like torchvision's own `.pth` files.

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


def make_raft_checkpoint(target: Path, seed: int = 0) -> Path:
    import torch
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(seed)
    target.mkdir(parents=True, exist_ok=True)
    path = target / RAFT_FILE
    torch.save(raft_small(weights=None, progress=False).state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    print(make_raft_checkpoint(args.target))


if __name__ == "__main__":
    main()
