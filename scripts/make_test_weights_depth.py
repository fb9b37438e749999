"""Writes a random-weight Depth Anything V2 Small as a transformers `save_pretrained` folder.

The architecture and the image processor are those of `depth-anything/Depth-Anything-V2-Small-hf`
(DINOv2-small backbone: 12 layers, 384 wide, 6 heads, features from layers 9-12; DPT neck
48/96/192/384; fusion 64; relative depth head; processor: short side 518, aspect ratio kept,
multiples of 14, bicubic, ImageNet mean/std). It proves wiring and formats, not accuracy.

    python scripts/make_test_weights_depth.py /tmp/weights  # writes depth-anything-v2-small/
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_FOLDER = "depth-anything-v2-small"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def v2_small_config() -> object:
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(
        image_size=518,
        patch_size=14,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        out_indices=[9, 10, 11, 12],
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=384,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64,
        head_in_index=-1,
        head_hidden_size=32,
        depth_estimation_type="relative",
    )


def v2_small_processor() -> object:
    from transformers import DPTImageProcessor

    return DPTImageProcessor(
        do_resize=True,
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,  # bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_pad=False,
    )


# Depth Anything V1 Small (`LiheYoung/depth-anything-small-hf`, the Perception Concept Studio's)
# has the same architecture and files as V2 Small; only the weights differ.
V1_FOLDER = "depth-anything-small-hf"


def make_depth_checkpoint(target: Path, seed: int = 0, folder_name: str = DEFAULT_FOLDER) -> Path:
    """`target/<folder_name>/` (config.json, model.safetensors, preprocessor_config.json), by
    default `depth-anything-v2-small`; returns the folder."""
    import torch
    from transformers import DepthAnythingForDepthEstimation

    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(v2_small_config()).eval()
    # Untrained, the last ReLU zeroes about half the map and the rest is ~1e-4: a map that
    # small and flat would prove nothing about scaling. A positive bias and a larger last
    # layer give values around 1 that still follow the image.
    with torch.no_grad():
        model.head.conv3.weight.mul_(3000.0)
        model.head.conv3.bias.fill_(1.0)
    folder = target / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    v2_small_processor().save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path, help="weights folder (WEIGHTS_DIR)")
    args = parser.parse_args()
    print(make_depth_checkpoint(args.target))


if __name__ == "__main__":
    main()
