"""The control types a request can ask for, and which of them a ControlNet-Union model serves.

One table for the download script (which records the types a baked model serves), the manifest reader and the
engine (which picks the model for each type and passes the union its control_mode).
"""

from __future__ import annotations

# predict.py's controlnet_N choices, less "none" (tests/test_schema.py checks the two agree).
CONTROL_TYPES = ("canny", "depth", "pose", "lineart", "soft_edge", "normal", "segmentation", "tile")

# xinsir/controlnet-union-sdxl-1.0's control_mode index per type (its ControlNetPlus README): openpose 0, depth 1,
# thick lines (scribble, HED, soft edge) 2, thin lines (canny, lineart, MLSD) 3, normal 4, segmentation 5; the ProMax
# release adds tile 6 and repaint 7 (not offered: it needs the masked source as its map).
UNION_CONTROL_MODES = {
    "pose": 0,
    "depth": 1,
    "soft_edge": 2,
    "canny": 3,
    "lineart": 3,
    "normal": 4,
    "segmentation": 5,
    "tile": 6,
}


def union_types(num_control_type: int) -> tuple[str, ...]:
    """The types a union model whose config has `num_control_type` modes serves: 6 in the first release, 8 in
    ProMax."""
    return tuple(t for t in CONTROL_TYPES if UNION_CONTROL_MODES[t] < num_control_type)
