"""Control maps from a user's image, made in the container with nothing fetched at run time.

canny  OpenCV's Canny edge detector on the RGB image. The thresholds are those of AUTOMATIC1111's ControlNet
       extension and of controlnet_aux's CannyDetector (which fofr's sdxl-multi-controlnet-lora runs), and of
       diffusers' SDXL canny examples: 100 and 200. Like them it runs on the colour image (OpenCV takes each
       pixel's strongest channel gradient), not on a grey conversion.
depth  A transformers depth estimator (Depth Anything V2 Small in the image), whose relative inverse depth is
       scaled to 0-255: near is white, as depth ControlNets were trained (MiDaS convention). The arithmetic is
       that of transformers' depth-estimation pipeline, so the map equals the pipeline's.

Both return an RGB image of the input's size (a ControlNet takes three channels; an edge or depth map repeats one).
Fitting the image to the output size is the caller's step, done before: a map is computed at the size it is used.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image
from transformers import BaseImageProcessor, PreTrainedModel

# Hysteresis thresholds on the gradient magnitude (see the module docstring for where they come from): a pixel
# above HIGH starts an edge, one above LOW continues it.
CANNY_LOW_THRESHOLD = 100
CANNY_HIGH_THRESHOLD = 200

# A depth map whose values span less than this fraction of their magnitude is flat: what is left is rounding (bicubic
# resizing of a constant map leaves differences of a few float32 steps, about 1e-7 of the value), which scaling to
# 0-255 would turn into a pattern.
FLAT_DEPTH_SPAN = 1e-4


def canny(image: Image.Image, low: int = CANNY_LOW_THRESHOLD, high: int = CANNY_HIGH_THRESHOLD) -> Image.Image:
    """White edges on black, as the canny ControlNets were trained."""
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return _grey_to_rgb(edges)


@torch.inference_mode()
def depth(model: PreTrainedModel, processor: BaseImageProcessor, image: Image.Image) -> Image.Image:
    """The estimated depth of `image`, near white and far black, at the image's size."""
    image = image.convert("RGB")
    # 1. The model's input (for Depth Anything: resized to sides of at least 518 that are multiples of 14).
    inputs = processor(images=image, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    # 2. Relative inverse depth, resized back to the image (bicubic, as the processor does for the pipeline).
    outputs = model(**inputs)
    predicted = processor.post_process_depth_estimation(outputs, target_sizes=[image.size[::-1]])[0]
    values = predicted["predicted_depth"].float().cpu().numpy()
    # 3. Scaled to 0-255 and truncated, as transformers' pipeline does. A flat map (nothing to tell apart) is black,
    # where the pipeline would divide by zero or stretch rounding noise.
    low, high = float(values.min()), float(values.max())
    if high - low <= FLAT_DEPTH_SPAN * max(abs(low), abs(high)):
        return _grey_to_rgb(np.zeros(values.shape, dtype=np.uint8))
    return _grey_to_rgb((((values - low) / (high - low)) * 255).astype(np.uint8))


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values, mode="L").convert("RGB")
