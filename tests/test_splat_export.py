"""Splat exporters (core/splat/export.py): PLY, RGB PLY, .splat and compressed PLY."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from plyfile import PlyData

from core.splat.export import (
    SH_C0,
    decode_splat,
    encode_splat,
    read_ply,
    write_compressed_ply,
    write_ply,
    write_rgb_ply,
    write_splat,
)


def _gaussians(n: int, sh_degree: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = (sh_degree + 1) ** 2
    return {
        "means": rng.normal(size=(n, 3)).astype(np.float32),
        "scales_log": rng.normal(-3.0, 1.0, size=(n, 3)).astype(np.float32),
        "quats": rng.normal(size=(n, 4)).astype(np.float32),
        "opacity_logit": rng.normal(0.5, 1.5, size=n).astype(np.float32),
        "sh_dc": rng.normal(size=(n, 3)).astype(np.float32),
        "sh_rest": (rng.normal(size=(n, k - 1, 3)) * 0.2).astype(np.float32),
    }


def _inria_names(sh_degree: int) -> list[str]:
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_ply_round_trip_inria_layout(tmp_path, sh_degree):
    g = _gaussians(257, sh_degree)
    path = tmp_path / "point_cloud.ply"
    write_ply(path, **g)

    raw = path.read_bytes()
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\n")
    ply = PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"]
    assert v.count == 257
    assert [p.name for p in v.properties] == _inria_names(sh_degree)
    assert all(v.data.dtype[name] == np.dtype("<f4") for name in v.data.dtype.names)
    # binary body is exactly N * (number of floats) * 4 bytes after the header
    header_len = raw.index(b"end_header\n") + len(b"end_header\n")
    assert len(raw) - header_len == 257 * len(_inria_names(sh_degree)) * 4

    # f_rest is channel-major: f_rest_j = rest[:, j % (K-1), j // (K-1)]
    k1 = (sh_degree + 1) ** 2 - 1
    for j in range(3 * k1):
        np.testing.assert_array_equal(v[f"f_rest_{j}"], g["sh_rest"][:, j % k1, j // k1])
    np.testing.assert_array_equal(v["rot_0"], g["quats"][:, 0])  # w first, raw (unnormalised)
    np.testing.assert_array_equal(v["nx"], 0)

    back = read_ply(path)
    assert list(back["property_names"]) == _inria_names(sh_degree)
    for key, value in g.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_ply_accepts_gsplat_shapes_and_rejects_bad_input(tmp_path):
    g = _gaussians(10, 1)
    write_ply(
        tmp_path / "a.ply",
        g["means"],
        g["scales_log"],
        g["quats"],
        g["opacity_logit"][:, None],  # [N, 1]
        g["sh_dc"][:, None, :],  # gsplat's sh0 [N, 1, 3]
        None,
    )
    back = read_ply(tmp_path / "a.ply")
    assert back["sh_rest"].shape == (10, 0, 3)
    np.testing.assert_array_equal(back["sh_dc"], g["sh_dc"])
    bad = dict(g)
    bad["means"] = g["means"].copy()
    bad["means"][3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_ply(tmp_path / "b.ply", **bad)
    with pytest.raises(ValueError, match="square"):
        write_ply(tmp_path / "c.ply", **{**g, "sh_rest": np.zeros((10, 4, 3), np.float32)})


def test_rgb_ply_is_a_plain_point_cloud(tmp_path):
    rng = np.random.default_rng(1)
    means = rng.normal(size=(100, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(100, 3), dtype=np.uint8)
    path = tmp_path / "baked_splat.ply"
    write_rgb_ply(path, means, rgb)
    v = PlyData.read(str(path))["vertex"]
    assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue"]
    assert v.data.dtype["red"] == np.uint8 and v.data.dtype["x"] == np.dtype("<f4")
    back = read_ply(path)
    np.testing.assert_array_equal(back["means"], means)
    np.testing.assert_array_equal(back["rgb"], rgb)
    with pytest.raises(TypeError):
        write_rgb_ply(path, means, rgb / 255.0)


def test_splat_size_order_and_decoding(tmp_path):
    n = 300
    g = _gaussians(n, 0, seed=2)
    path = tmp_path / "scene.splat"
    write_splat(path, g["means"], g["scales_log"], g["quats"], g["opacity_logit"], g["sh_dc"])
    data = path.read_bytes()
    assert len(data) == 32 * n
    d = decode_splat(data)

    # antimatter15 order: decreasing exp(sum log scale) * sigmoid(opacity)
    sig = 1 / (1 + np.exp(-g["opacity_logit"].astype(np.float64)))
    importance = np.exp(g["scales_log"].astype(np.float64).sum(1)) * sig
    order = np.argsort(-importance, kind="stable")
    np.testing.assert_array_equal(d["means"], g["means"][order])  # float32 exact
    np.testing.assert_allclose(d["scales"], np.exp(g["scales_log"][order]), rtol=1e-6)

    rgb = np.clip(0.5 + SH_C0 * g["sh_dc"][order], 0, 1)
    assert np.all(np.abs(d["colors"] - rgb) <= 1 / 255 + 1e-6)  # 8-bit, truncated
    assert np.all(np.abs(d["opacities"] - sig[order]) <= 1 / 255 + 1e-6)
    qn = g["quats"][order] / np.linalg.norm(g["quats"][order], axis=1, keepdims=True)
    assert np.all(np.abs(d["quats"] - np.clip(qn, -1, 127 / 128)) <= 1 / 128 + 1e-6)
    assert np.all(np.diff(importance[order]) <= 0)


def test_splat_matches_gsplat_records():
    """Same 32-byte records as gsplat's own exporter (which orders by Morton code)."""
    if importlib.util.find_spec("gsplat") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("gsplat is not installed: no reference exporter")
    torch = pytest.importorskip("torch")
    exporter = pytest.importorskip("gsplat.exporter")
    g = _gaussians(200, 1, seed=3)
    t = {k: torch.from_numpy(v) for k, v in g.items()}
    theirs = exporter.export_splats(
        t["means"],
        t["scales_log"],
        t["quats"],
        t["opacity_logit"],
        t["sh_dc"][:, None],
        t["sh_rest"],
        format="splat",
    )
    ours = encode_splat(g["means"], g["scales_log"], g["quats"], g["opacity_logit"], g["sh_dc"])
    a, b = decode_splat(ours), decode_splat(theirs)
    ia, ib = np.lexsort(a["means"].T), np.lexsort(b["means"].T)
    np.testing.assert_array_equal(a["means"][ia], b["means"][ib])
    np.testing.assert_allclose(a["scales"][ia], b["scales"][ib], rtol=1e-6)  # exp ulp
    np.testing.assert_array_equal(a["rgba"][ia], b["rgba"][ib])
    np.testing.assert_array_equal(a["quats"][ia], b["quats"][ib])


def test_compressed_ply_matches_gsplat_bytes(tmp_path):
    g = _gaussians(700, 3, seed=4)
    path = tmp_path / "scene.compressed.ply"
    n = write_compressed_ply(path, **g)
    ply = PlyData.read(str(path))
    assert [(e.name, e.count) for e in ply.elements] == [("chunk", 3), ("vertex", n), ("sh", n)]
    assert [p.name for p in ply["vertex"].properties] == [
        "packed_position",
        "packed_rotation",
        "packed_scale",
        "packed_color",
    ]
    assert len(ply["sh"].properties) == 45
    if importlib.util.find_spec("gsplat") is None:
        pytest.skip("gsplat is not installed: byte comparison skipped")
    torch = pytest.importorskip("torch")
    exporter = pytest.importorskip("gsplat.exporter")
    t = {k: torch.from_numpy(v) for k, v in g.items()}
    theirs = exporter.export_splats(
        t["means"],
        t["scales_log"],
        t["quats"],
        t["opacity_logit"],
        t["sh_dc"][:, None],
        t["sh_rest"],
        format="ply_compressed",
    )
    assert path.read_bytes() == theirs
