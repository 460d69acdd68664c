"""Half precision on the CPU, end to end: predict.py's Predictor set up with SDXL_DTYPE=bfloat16 and with
SDXL_DTYPE=float16 runs every mode and feature (devtools/half_precision.CASES) to a sane image close to
the float32 one from the same inputs and seed. GPUs serve in float16; the rest of the suite runs in float32.

Why the images differ at all. The weights are stored in float16 and loaded as they are, so every dtype computes
with the same weights and the same starting noise (rounded to the dtype); what differs is the rounding of every
activation: to 8 significant bits in bfloat16, 11 in float16, 24 in float32. Through the text encoders, the UNet's
steps (each output the next step's input) and the VAE, the rounding compounds into a small noise-like difference,
the more so where the tiny random networks amplify: bfloat16 leaves 13-35% of the pixels more than one grey level
off, float16 0.1-0.8% (its error sits near the uint8 rounding floor). The watermark quantizes wavelet coefficients
in steps of 36, so a coefficient that rounding moves across a step changes a block of chroma by several levels
(float16: 4.9% of pixels off). Lossy codecs lose 25-27 dB on these noise-like images and turn any input difference
into a different set of quantization choices, so JPEG and WebP figures are set by the codec.

The figures (bench/half_precision.py, 8 seeds, every case; bench/RESULTS.md section 11), PSNR against float32:

    bfloat16  png 39.1-49.7 dB (RMS 0.8-2.8 grey levels)    jpg/webp at quality 95  38.2-39.6 dB
    float16   png 49.2-61.4 dB (55.0 and up but for the watermark at 256 px)    jpg/webp  40.9-43.9 dB

What bugs do to the same float32 images (test_the_bounds_would_catch_what_real_bugs_do checks each):

    red and blue swapped                                   png 12.2-23.0 dB, jpg/webp 26.4-27.4 dB
    the request's LoRA or model ignored                     23.7-28.7 dB
    another image (the next seed's)                         20.0-24.0 dB
    denormalization skipped (the [-1, 1] sample as [0, 1])  6.8-8.6 dB
    NaN (cast to 0: black) or an overflow to one colour     refused as one colour whatever its PSNR

Each bound lies about 4-5 dB (RMS error x 1.6-1.8) below the lowest figure its dtype and format reached, and at
least 6 dB above the highest figure of any bug. The tiny models' images are low in contrast (a standard
deviation of about 18 grey levels around mid-grey), which is why even an unrelated image scores 20 dB here.

What a PSNR against float32 cannot see: a bug that changes every dtype alike (the float32 tests catch those), and
a module left in float32 in a half-precision run, whose images are closer to float32, not further:
test_every_module_holds_the_requested_dtype checks every module's tensors for that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.half_precision import (
    CASES,
    HALF_DTYPES,
    OWN_TEXT_ENCODERS,
    OWN_UNET,
    REFERENCE_DTYPE,
    SEED,
    Rig,
    is_lossy,
    is_one_colour,
    psnr,
)
from sdxl_cog.finishing.watermark import has_watermark

pytestmark = pytest.mark.half

# PNG (lossless) per dtype; JPEG and WebP, whose figures the codec sets, one bound for both (see above).
PSNR_BOUND_DB = {"bfloat16": 35.0, "float16": 44.0}
LOSSY_PSNR_BOUND_DB = 34.0
LOWEST_BOUND_DB = min(*PSNR_BOUND_DB.values(), LOSSY_PSNR_BOUND_DB)
# Pillow's names for what each output_format writes.
FILE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def bound(dtype: str, case: str) -> float:
    return LOSSY_PSNR_BOUND_DB if is_lossy(case) else PSNR_BOUND_DB[dtype]


@pytest.fixture(scope="module")
def rig(tiny_weights, tmp_path_factory):
    rig = Rig(tiny_weights, tmp_path_factory.mktemp("half"))
    yield rig
    rig.close()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_mode_is_sane_and_close_to_float32(rig, dtype, case):
    reference, half = rig.outcome(REFERENCE_DTYPE, case), rig.outcome(dtype, case)
    assert len(half.images) == len(reference.images)
    output_format = CASES[case].get("output_format", "png")
    assert half.formats == [FILE_FORMATS[output_format]] * len(half.images)
    for image, expected in zip(half.images, reference.images):
        assert image.shape == expected.shape
        assert not is_one_colour(image), f"{dtype} {case}: one colour {image[0, 0]} (NaN, black or overflow)"
        assert psnr(image, expected) >= bound(dtype, case), f"{dtype} {case}: {psnr(image, expected):.1f} dB"
    # Nothing flagged (the tiny checker never flags), the requested model, the same steps run.
    same = ("model", "nsfw_flagged", "base_steps", "refiner_steps", "seeds")
    assert {k: half.metrics.get(k) for k in same} == {k: reference.metrics.get(k) for k in same}
    if case == "watermark_256":
        assert all(has_watermark(Image.fromarray(image)) for image in half.images)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_flagged_images_come_back_black_in_half_precision(rig, dtype):
    """The safety checker in half precision still sees the image: a checker that flags everything flags both."""
    flagged = rig.run(dtype, "txt2img", weights=rig.flagging_weights)
    assert flagged.metrics["nsfw_flagged"] == [True, True]
    assert all(not image.any() for image in flagged.images)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_module_holds_the_requested_dtype(rig, dtype):
    """Every module of every checkpoint, the shared ones and a loaded LoRA's layers hold their floating-point
    tensors in SDXL_DTYPE: a module left in float32 would pass every image comparison, only slower."""
    rig.outcome(dtype, "lora")  # its adapter stays loaded (disabled) after the request
    service = rig.predictor(dtype).service
    modules = dict(service.weights.placement.modules)
    for checkpoint in service.checkpoints.by_name.values():
        modules.update(
            {
                f"{checkpoint.name}.{c}": checkpoint.model.components[c]
                for c in ("text_encoder", "text_encoder_2", "unet")
            }
        )
    expected = getattr(torch, dtype)
    for name, module in modules.items():
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        wrong = {key: t.dtype for key, t in tensors.items() if t.is_floating_point() and t.dtype != expected}
        assert not wrong, f"{name}: {wrong}"
    unet = service.checkpoints.default.model.components["unet"]
    lora_layers = [n for n, _ in unet.named_parameters() if ".lora_" in n]
    assert lora_layers, "the LoRA request left no adapter to check"


# What each kind of bug does to an image, applied to the float32 references.
BUGS = {
    "red and blue swapped": lambda image: image[..., ::-1],
    # VaeImageProcessor.denormalize skipped: the [-1, 1] sample read as if it were [0, 1].
    "denormalization skipped": lambda image: np.clip(image.astype(np.int16) * 2 - 255, 0, 255).astype(np.uint8),
}


def test_the_bounds_would_catch_what_real_bugs_do(rig):
    """The bounds are tight enough for these images: each kind of bug, and each input a half-precision run could
    silently drop (the LoRA, the model), moves the float32 image further than any bound allows."""
    for case in CASES:
        for image in rig.outcome(REFERENCE_DTYPE, case).images:
            for bug, apply in BUGS.items():
                assert psnr(apply(image), image) < LOWEST_BOUND_DB, f"{case}: {bug}"
    plain = rig.outcome(REFERENCE_DTYPE, "txt2img").images[0]
    for dropped in ("lora", "model_own_unet", "model_own_text_encoders"):
        assert psnr(rig.outcome(REFERENCE_DTYPE, dropped).images[0], plain) < LOWEST_BOUND_DB, dropped
    other_seed = rig.outcome(REFERENCE_DTYPE, "safety_checker_off", seed=SEED + 1).images[0]
    assert psnr(other_seed, rig.outcome(REFERENCE_DTYPE, "safety_checker_off").images[0]) < LOWEST_BOUND_DB
    assert {OWN_UNET, OWN_TEXT_ENCODERS} <= set(rig.predictor(REFERENCE_DTYPE).service.checkpoints.names)
