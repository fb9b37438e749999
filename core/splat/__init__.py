"""3D Gaussian splatting: CPU rasterizer and exporters (pure functions)."""
