"""Writes `sam3.pt` with random weights: SAM 3's real architecture, laid out as Meta's file is.

Meta's `sam3.pt` (Hugging Face `facebook/sam3`, gated) is one state dict holding the image
detector under `detector.` and the video tracker under `tracker.` (its memory attention as
`tracker.transformer.encoder.` and its memory encoder as `tracker.maskmem_backbone.`). This
builds both with Ultralytics' own builders, maps their tensors back to those names, and saves
them, so that the worker loads it through the same code as the real file. It proves wiring and
formats, not accuracy.

The tensors are saved as float16 by default (1.7 GB instead of 3.4 GB; loading casts them to
the model's float32), which halves the tests' disk and memory. Building takes about 20 s and
4 GB of memory on 2 CPU cores.

    python scripts/make_test_weights_sam3.py /tmp/weights [--float32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

DEFAULT_NAME = "sam3.pt"
# Tracker modules that Meta's file names differently (see build_sam3._load_checkpoint).
TRACKER_RENAMES = {
    "memory_attention.": "tracker.transformer.encoder.",
    "memory_encoder.": "tracker.maskmem_backbone.",
}
# Created with torch.empty by Ultralytics (the real file always fills them): give them values.
UNINITIALISED = ("positional_embedding", "text_projection")
# Untrained, the tracker's mask decoder gives empty masks and "no object" scores, so objects
# vanish after the first frame; these biases make it keep non-empty masks, so that the tests
# see objects carried across frames (like the positive biases of the YOLO segmentation maker).
DECODER = "tracker.sam_mask_decoder."
TRACKER_BIASES = {
    f"{DECODER}output_upscaling.3.bias": 4.0,
    **{f"{DECODER}output_hypernetworks_mlps.{i}.layers.2.bias": 1.0 for i in range(4)},
    f"{DECODER}pred_obj_score_head.layers.2.bias": 10.0,
}


def tracker_key(name: str) -> str:
    for ours, theirs in TRACKER_RENAMES.items():
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return f"tracker.{name}"


def make_sam3_checkpoint(target: Path, seed: int = 0, float16: bool = True) -> Path:
    import torch

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip-anytorch imports pkg_resources, which warns
        import clip  # noqa: F401 - imported by the builder; fail here, clearly, if absent
    from ultralytics.models.sam.build_sam3 import build_interactive_sam3, build_sam3_image_model

    torch.manual_seed(seed)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch) / "empty.pt"
        torch.save({}, empty)  # nothing to load: the builders keep their random initialisation
        detector = build_sam3_image_model(str(empty))
        tracker = build_interactive_sam3(str(empty), with_backbone=False)

    state: dict[str, torch.Tensor] = {}
    missing = set(TRACKER_BIASES) - {tracker_key(name) for name in tracker.state_dict()}
    if missing:
        raise RuntimeError(f"the tracker has no {sorted(missing)}: Ultralytics changed SAM 3")
    for name, tensor in detector.state_dict().items():
        state[f"detector.{name}"] = tensor
    for name, tensor in tracker.state_dict().items():
        state[tracker_key(name)] = tensor
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if name.endswith(UNINITIALISED):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
        if name in TRACKER_BIASES:
            tensor.fill_(TRACKER_BIASES[name])
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise RuntimeError(f"{name} has non-finite values after initialisation")
            if float16:
                state[name] = tensor.half()
    del detector, tracker

    path = target / DEFAULT_NAME
    partial = path.with_name(f"{path.name}.partial")
    torch.save(state, partial)
    partial.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32", action="store_true", help="keep float32 (3.4 GB)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(make_sam3_checkpoint(args.target, args.seed, float16=not args.float32))


if __name__ == "__main__":
    main()
