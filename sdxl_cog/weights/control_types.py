"""The control types a request can name, and how a ControlNet-Union serves each: one table for the download, the
manifest's catalog and the engine.

A union checkpoint (diffusers' ControlNetUnionModel, xinsir/controlnet-union-sdxl-1.0) takes a `control_mode` per
control image; the modes are xinsir's ControlNetPlus README's. Its config's `num_control_type` says how many modes it
was trained with: 6 in the first release, 8 in ProMax, which added tile (6) and repaint (7). A mode below that count is
served, so the table's indices alone say which types need ProMax. Repaint (7) is not offered: inpainting has its own
mode here.
"""

from __future__ import annotations

# Type -> the union's control_mode, in the order the API lists the types. Canny and lineart share mode 3 ("thin
# lines": canny, MLSD, lineart were all trained into it).
UNION_CONTROL_MODES = {
    "canny": 3,
    "depth": 1,
    "pose": 0,
    "lineart": 3,
    "soft_edge": 2,
    "normal": 4,
    "segmentation": 5,
    "tile": 6,  # ProMax only (num_control_type 8)
}
CONTROL_TYPES = tuple(UNION_CONTROL_MODES)

# A ControlNet's kind: a single-type one serves one type; a union (ControlNetUnionModel) each of union_types(...).
SINGLE, UNION = "single", "union"
CONTROLNET_KINDS = (SINGLE, UNION)


def union_types(num_control_type: int) -> tuple[str, ...]:
    """The types a union checkpoint with `num_control_type` modes serves (its config.json's value)."""
    return tuple(name for name, mode in UNION_CONTROL_MODES.items() if mode < num_control_type)
