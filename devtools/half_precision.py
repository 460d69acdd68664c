"""The half-precision rig: predict.py's own Predictor set up once per dtype (SDXL_DTYPE, as an operator sets
it) on tiny synthetic weights, and every mode and feature run through its predict() with the same inputs and
seed in each dtype, so that the images can be compared with the float32 ones.

Shared by the half-precision test tier (tests/test_half_precision.py), which asserts on the images, and by
bench/half_precision.py, which prints their PSNR distribution over many seeds (what the tier's bounds rest on).
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from cog.types import Path as CogPath
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from devtools.synthetic import add_model, set_safety_checker_flags_everything
from devtools.synthetic_control import add_control
from predict import Predictor
from sdxl_cog.config import MIN_SIDE, WATERMARK_MIN_SIDE

REFERENCE_DTYPE = "float32"
HALF_DTYPES = ("bfloat16", "float16")

# The smallest request (16x16 latents) and the suite's step count: the rounding compounds over every step.
SIDE = MIN_SIDE
STEPS = 4
SEED = 1234
# Two further checkpoints: one with its own UNet (the text encoders are base/'s), one with its own text encoders too.
OWN_UNET, OWN_TEXT_ENCODERS = "own-unet", "own-text-encoders"
LORA_FILE = "half.safetensors"
# A LoRA on the attention's values and outputs alone, at a scale where it changes the image well past the
# tier's bounds (PSNR about 28 dB against the image without it). A random LoRA that also changes the queries and
# keys, as tests/conftest.py's does, sharpens the attention until the image is chaotic: at scale 0.6 and more,
# float32 at 0.8 against float32 at 0.8001 already differ as two unrelated images do (about 21 dB), so no
# comparison of precisions could be made on it (bench/half_precision.py measures both).
LORA_TARGETS = ["to_v", "to_out.0"]
LORA_RANK = 4
LORA_GAIN = 4  # random weights of std 0.02, times 4: a visible change
LORA_SCALE = 0.3

# Stand-ins for the files a case sends, made per call (coglet deletes each download after its prediction).
SOURCE, MASK, LORA = "<source image>", "<mask>", "<lora>"
# Every mode and every feature that touches the pixels, each as the inputs it adds to the common ones. Below
# WATERMARK_MIN_SIDE the watermark is skipped, so every case but watermark_256 leaves apply_watermark at its
# default (on) at no cost; the safety checker is on (its default) in every case but safety_checker_off.
# Lossy formats are asked at quality 95: their own error on these noise-like images is larger than that of
# half precision (see LOSSY_FORMATS).
CASES: dict[str, dict] = {
    "txt2img": {"num_outputs": 2},
    "expert_ensemble_refiner": {"refine": "expert_ensemble_refiner"},
    "base_image_refiner": {"refine": "base_image_refiner"},
    # K_EULER, the default, runs every other case. DDIM reads what Euler ignores in the checkpoint's scheduler config
    # (clip_sample, set_alpha_to_one): when the synthetic config lacked them, DDIM clipped its predictions, unlike on
    # the real weights, and sat 9 dB further from float32 in bfloat16 than any other sampler.
    "ddim": {"scheduler": "DDIM"},
    "img2img": {"image": SOURCE},
    "inpaint": {"image": SOURCE, "mask": MASK},
    "inpaint_expert_ensemble": {"image": SOURCE, "mask": MASK, "refine": "expert_ensemble_refiner"},
    "refiner_only": {"image": SOURCE, "refine": "refiner_only"},
    "refiner_only_masked": {"image": SOURCE, "mask": MASK, "refine": "refiner_only"},
    "lora": {"lora_weights": LORA, "lora_scale": LORA_SCALE},
    "model_own_unet": {"model": OWN_UNET},
    "model_own_text_encoders": {"model": OWN_TEXT_ENCODERS},
    # ControlNet and the IP-Adapter (tiny control models baked beside the rest): canny and a ready pose map on the
    # union with an image prompt, and a depth map made by the depth estimator for the single-type depth ControlNet.
    "control_and_image_prompt": {
        "controlnet_1": "canny",
        "controlnet_1_image": SOURCE,
        "controlnet_2": "pose",
        "controlnet_2_image": MASK,
        "controlnet_2_preprocess": False,
        "ip_adapter_image": SOURCE,
    },
    "control_depth_preprocessed": {"controlnet_1": "depth", "controlnet_1_image": SOURCE},
    "safety_checker_off": {"disable_safety_checker": True},
    "watermark_256": {"width": WATERMARK_MIN_SIDE, "height": WATERMARK_MIN_SIDE},
    "jpg": {"output_format": "jpg", "output_quality": 95},
    "webp": {"output_format": "webp", "output_quality": 95},
}
LOSSY_FORMATS = ("jpg", "webp")
# predict()'s file inputs, sent as the cases' stand-ins say.
FILE_INPUTS = ("image", "mask", "controlnet_1_image", "controlnet_2_image", "controlnet_3_image", "ip_adapter_image")
# The inputs every case shares; predict()'s own defaults fill the rest.
COMMON_INPUTS = {"prompt": "a red fox in the snow", "num_inference_steps": STEPS, "seed": SEED}
# predict()'s declared defaults, as coglet passes them for every input a request leaves out.
INPUT_DEFAULTS = {
    name: parameter.default.default
    for name, parameter in inspect.signature(Predictor.predict).parameters.items()
    if name != "self"
}


def case_inputs(case: str, seed: int = SEED) -> dict:
    """The request a case sends (stand-ins for its files), before predict()'s defaults fill the rest."""
    inputs = {**COMMON_INPUTS, "seed": seed, **CASES[case]}
    if "image" not in inputs:  # with an image, the size follows the image
        inputs = {"width": SIDE, "height": SIDE, **inputs}
    return inputs


def is_lossy(case: str) -> bool:
    return CASES[case].get("output_format") in LOSSY_FORMATS


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def is_one_colour(image: np.ndarray) -> bool:
    """Every pixel the same colour: what a NaN (decoded to 0), an all-black or a saturated image looks like."""
    return not bool((image != image[:1, :1]).any())


class RecordingPredictor(Predictor):
    """predict.py's Predictor, its setup() and predict() untouched; the metrics it records are kept for the caller
    (coglet collects them into the response; outside coglet Cog's record_metric drops them)."""

    def record_metric(self, key: str, value, mode: str = "replace") -> None:
        self.metrics[key] = value


@dataclasses.dataclass
class Outcome:
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB, decoded from the files predict() returned
    metrics: dict
    formats: list[str]  # what each file really is (Pillow's format name)


def _png_data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _source_pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)


def _mask_pixels() -> np.ndarray:
    """Keeps the left half (black), repaints the right half (white)."""
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[:, SIDE // 2 :] = 255
    return mask


def write_lora(weights: Path, path: Path) -> None:
    """A PEFT-format LoRA for the tiny base UNet (LORA_TARGETS), seeded."""
    unet = UNet2DConditionModel.from_pretrained(weights / "base" / "unet", variant="fp16", dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=LORA_TARGETS)
    unet.add_adapter(config)
    state = {f"unet.{k}": v.contiguous() * LORA_GAIN for k, v in get_peft_model_state_dict(unet).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)


class Rig:
    """Predictors per (weights, dtype), set up on first use and kept; outcomes per (dtype, case, seed), kept, so
    that one float32 reference set serves every half dtype.

    `tiny_weights`: weights made by synthetic.make_weights(size="tiny"); copied, never changed."""

    def __init__(self, tiny_weights: Path, scratch: Path):
        self.scratch = scratch
        self.weights = Path(shutil.copytree(tiny_weights, scratch / "weights"))
        add_model(self.weights, OWN_UNET, seed=1)
        add_model(self.weights, OWN_TEXT_ENCODERS, seed=2, own=("text_encoder", "text_encoder_2"))
        add_control(self.weights)
        # The same weights with a safety checker that flags every image.
        self.flagging_weights = Path(shutil.copytree(tiny_weights, scratch / "flagging-weights"))
        set_safety_checker_flags_everything(self.flagging_weights)
        self.loras = scratch / "loras"
        write_lora(tiny_weights, self.loras / LORA_FILE)
        self.source, self.mask = _png_data_uri(_source_pixels()), _png_data_uri(_mask_pixels())
        self.predictors: dict[tuple[Path, str], RecordingPredictor] = {}
        self.outcomes: dict[tuple[str, str, int], Outcome] = {}
        self._tempdir = tempfile.tempdir  # setup() makes its input directory the process's temporary directory

    def predictor(self, dtype: str, weights: Path | None = None) -> RecordingPredictor:
        weights = weights or self.weights
        key = (weights, dtype)
        if key not in self.predictors:
            self.predictors[key] = self._set_up(weights, dtype)
        return self.predictors[key]

    def _set_up(self, weights: Path, dtype: str) -> RecordingPredictor:
        own = self.scratch / f"{weights.name}-{dtype}"
        own.mkdir()
        env = {
            "SDXL_WEIGHTS_DIR": weights,
            "SDXL_DEVICE": "cpu",
            "SDXL_DTYPE": dtype,
            "SDXL_LOW_VRAM": "0",
            "SDXL_OUTPUT_DIR": own / "outputs",
            "SDXL_PREDICTION_MARKER": own / "prediction-started",
            # One input directory for all: it is the process's temporary directory, where cog writes downloads.
            "SDXL_INPUT_DIR": self.scratch / "inputs",
            "SDXL_LORA_CACHE_DIR": self.scratch / "lora-cache",
            "SDXL_LORA_LOCAL_DIRS": self.loras,
        }
        saved = {name: value for name, value in os.environ.items() if name.startswith("SDXL_")}
        try:
            for name in saved:  # only what this rig sets: none of the developer's own SDXL_* settings
                del os.environ[name]
            os.environ.update({name: str(value) for name, value in env.items()})
            predictor = RecordingPredictor()
            predictor.setup()
        finally:
            for name in env:
                os.environ.pop(name, None)
            os.environ.update(saved)
        return predictor

    def _file(self, value):
        """A file input as coglet hands it to predict(): cog's own download of a data: URI into the temporary
        directory, a Path predict.py accepts as a client's upload."""
        uri = {SOURCE: self.source, MASK: self.mask}[value]
        return CogPath.validate(uri).convert()

    def run(self, dtype: str, case: str, seed: int = SEED, weights: Path | None = None) -> Outcome:
        """One prediction of `case` in `dtype` through predict(), its files decoded at once."""
        predictor = self.predictor(dtype, weights)
        inputs = {**INPUT_DEFAULTS, **case_inputs(case, seed)}
        for name in FILE_INPUTS:
            if inputs[name] is not None:
                inputs[name] = self._file(inputs[name])
        if inputs["lora_weights"] == LORA:
            inputs["lora_weights"] = str(self.loras / LORA_FILE)
        predictor.metrics = {}
        paths = predictor.predict(**inputs)
        images, formats = [], []
        for path in paths:
            with Image.open(path) as image:
                formats.append(image.format)
                images.append(np.asarray(image.convert("RGB")))
        return Outcome(images, predictor.metrics, formats)

    def outcome(self, dtype: str, case: str, seed: int = SEED) -> Outcome:
        """run() on the default weights, once per (dtype, case, seed)."""
        key = (dtype, case, seed)
        if key not in self.outcomes:
            self.outcomes[key] = self.run(dtype, case, seed)
        return self.outcomes[key]

    def close(self) -> None:
        tempfile.tempdir = self._tempdir
