"""The labels `cog build` puts on an image, for images built from our Dockerfile (`make image`).

The Cog CLI recognises a model image by them: without `run.cog.config`, `cog predict IMAGE` answers that the
image does not appear to be a Cog model, and registries such as Replicate read the API from
`run.cog.openapi_schema` (replicate/cog pkg/image/build.go, pkg/image/config.go).

    python -m sdxl_cog.schema.image_labels [--out-dir build/cog]

writes one file per label value (compact JSON, as Cog writes them), for the Makefile to pass as --label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from sdxl_cog.schema.openapi import DEFAULT_PREDICTOR, build_schema, cog_version

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_FILES = {
    "run.cog.version": "version",
    "run.cog.config": "config.json",
    "run.cog.openapi_schema": "openapi_schema.json",
}


def label_values(root: Path = REPO_ROOT, predictor: str = DEFAULT_PREDICTOR) -> dict[str, str]:
    compact = {"separators": (",", ":")}
    config = yaml.safe_load((root / "cog.yaml").read_text())
    return {
        "run.cog.version": cog_version(root),
        "run.cog.config": json.dumps(config, **compact),
        "run.cog.openapi_schema": json.dumps(build_schema(str(root / predictor)), **compact),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_cog.schema.image_labels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out-dir", type=Path, default=Path("build/cog"), help="default: %(default)s")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for label, value in label_values().items():
        (args.out_dir / LABEL_FILES[label]).write_text(value)


if __name__ == "__main__":
    main()
