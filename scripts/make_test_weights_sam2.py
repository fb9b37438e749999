"""Writes a SAM 2.1 checkpoint of the real architecture with random weights, in Meta's format
(`torch.save({"model": state_dict})`), built from the config the `sam2` package ships.

It proves wiring and formats, not accuracy (no pretrained weights can be fetched offline).
Used by tests/test_sam2.py and bench/bench_sam2.py:
    python scripts/make_test_weights_sam2.py /tmp/weights [--name sam2.1_hiera_small.pt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.tasks._sam2_model import CONFIGS, DEFAULT_MODEL

OBJECT_SCORE_BIAS = 10.0


def make_sam2_checkpoint(target: Path, name: str = DEFAULT_MODEL, seed: int = 0) -> Path:
    """`target/name`: a randomly initialised model of that size, saved as Meta saves theirs."""
    import torch
    from sam2.build_sam import build_sam2

    if name not in CONFIGS:
        raise ValueError(f"{name} is not one of {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    model = build_sam2(CONFIGS[name], ckpt_path=None, device="cpu", mode="eval")
    # An untrained occlusion head calls about half the objects absent, and SAM 2 then blanks
    # their masks; a positive bias keeps every object present so masks exist to compare.
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(OBJECT_SCORE_BIAS)
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    torch.save({"model": model.state_dict()}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument("--name", default=DEFAULT_MODEL, choices=sorted(CONFIGS))
    args = parser.parse_args()
    print(make_sam2_checkpoint(args.target, args.name))


if __name__ == "__main__":
    main()
