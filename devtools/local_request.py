"""A request made in process as predict.py makes one, for tests and benchmarks that call the engine without a server.

The inputs left out take predict.py's own defaults, read from its signature, so that a changed default reaches
every caller; image and mask are the caller's local files (not files Cog downloaded).
"""

from __future__ import annotations

import inspect

from predict import Predictor
from sdxl_cog.inputs.request import GenerationRequest, build_request

# The inputs build_request takes by name that predict.py passes through unchanged (the control slots it groups).
_PASSED_THROUGH = [name for name in inspect.signature(build_request).parameters if name not in ("controls", "profile")]


def predict_defaults() -> dict[str, object]:
    """`{input: default}` for the inputs of predict.py that build_request takes as they are."""
    parameters = inspect.signature(Predictor.predict).parameters
    return {name: parameters[name].default.default for name in _PASSED_THROUGH if name in parameters}


def local_request(**fields) -> GenerationRequest:
    """predict.py's defaults, then `fields` (controls=, profile= and any input)."""
    return build_request(**{**predict_defaults(), **fields, "files_from_client": False})
