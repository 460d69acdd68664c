"""Stable Diffusion XL 1.0 (base + refiner) as a Cog predictor.

This file is the API's specification: the inputs, their bounds and defaults. The work is done in the
sdxl_cog package. Input names and defaults follow stability-ai/sdxl on Replicate, so its users can
switch without changing their requests.
"""

from cog import BasePredictor, Input, Path

from sdxl_cog import config as c
from sdxl_cog.config import Settings
from sdxl_cog.outputs import OUTPUT_FORMATS
from sdxl_cog.request import REFINE_MODES, build_request
from sdxl_cog.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdxl_cog.service import OutputOptions, SDXLService


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load base, refiner, VAE and safety checker from weights/ (SDXL_WEIGHTS_DIR) once."""
        self.service = SDXLService(Settings.from_env())

    def predict(
        self,
        prompt: str = Input(
            description="What to draw. Longer than 77 tokens is fine: nothing is truncated.", default=c.DEFAULT_PROMPT
        ),
        negative_prompt: str = Input(description="What to keep out of the image.", default=""),
        image: Path | None = Input(
            description="Source image for img2img, or for inpainting together with mask.", default=None
        ),
        mask: Path | None = Input(
            description="Inpainting mask for image: black areas are kept exactly, white areas are repainted.",
            default=None,
        ),
        width: int | None = Input(
            description=f"Output width, a multiple of 8. Default {c.DEFAULT_SIDE} for text-to-image; with an image, follows the image.",
            default=None,
            ge=c.MIN_SIDE,
            le=c.MAX_SIDE,
        ),
        height: int | None = Input(
            description=f"Output height, a multiple of 8. Default {c.DEFAULT_SIDE} for text-to-image; with an image, follows the image.",
            default=None,
            ge=c.MIN_SIDE,
            le=c.MAX_SIDE,
        ),
        num_outputs: int = Input(
            description="Number of images. Image i uses seed + i.", default=1, ge=1, le=c.MAX_OUTPUTS
        ),
        scheduler: str = Input(description="Sampler.", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS)),
        num_inference_steps: int = Input(description="Denoising steps.", default=c.DEFAULT_STEPS, ge=1, le=c.MAX_STEPS),
        guidance_scale: float = Input(
            description="Classifier-free guidance scale.", default=c.DEFAULT_GUIDANCE, ge=1, le=50
        ),
        prompt_strength: float = Input(
            description="img2img/inpaint: how much of the source image is replaced (1.0 = all of it).",
            default=c.DEFAULT_PROMPT_STRENGTH,
            ge=0,
            le=1,
        ),
        seed: int | None = Input(
            description="Random seed. Leave blank for a random one; the seeds used are returned in metrics.",
            default=None,
            ge=0,
            le=c.MAX_SEED,
        ),
        refine: str = Input(
            description="Refiner: none, expert ensemble (base hands over at high_noise_frac), or img2img on the base's image.",
            default="no_refiner",
            choices=REFINE_MODES,
        ),
        high_noise_frac: float = Input(
            description="expert_ensemble_refiner: fraction of the steps the base runs.",
            default=c.DEFAULT_HIGH_NOISE_FRAC,
            ge=0,
            le=1,
        ),
        refine_steps: int | None = Input(
            description="base_image_refiner: refiner steps to run. Default: num_inference_steps x refine_strength.",
            default=None,
            ge=1,
            le=c.MAX_STEPS,
        ),
        refine_strength: float = Input(
            description="base_image_refiner: how much noise the refiner adds back before refining.",
            default=c.DEFAULT_REFINE_STRENGTH,
            ge=0.01,
            le=1,
        ),
        apply_watermark: bool = Input(
            description="Embed SDXL's invisible watermark, so the images can be identified as generated.", default=True
        ),
        disable_safety_checker: bool = Input(
            description="Skip the safety checker (flagged images are otherwise replaced by black).", default=False
        ),
        lora_weights: str | None = Input(
            description="LoRA to apply: https URL or local path of a .safetensors file (diffusers/PEFT or kohya keys).",
            default=None,
        ),
        lora_scale: float = Input(
            description="LoRA strength (0 = off, 1 = full).", default=c.DEFAULT_LORA_SCALE, ge=0, le=1
        ),
        output_format: str = Input(
            description="Image file format. PNG is lossless.", default="png", choices=OUTPUT_FORMATS
        ),
        output_quality: int = Input(
            description="jpg/webp quality (webp at 100 is lossless); ignored for png.",
            default=c.DEFAULT_OUTPUT_QUALITY,
            ge=0,
            le=100,
        ),
    ) -> list[Path]:
        """Generate images; seeds, per-phase timings and safety flags are returned in metrics."""
        request = build_request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=image,
            mask=mask,
            width=width,
            height=height,
            num_outputs=num_outputs,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            prompt_strength=prompt_strength,
            seed=seed,
            refine=refine,
            high_noise_frac=high_noise_frac,
            refine_steps=refine_steps,
            refine_strength=refine_strength,
        )
        options = OutputOptions(output_format, output_quality, apply_watermark, safety_check=not disable_safety_checker)
        prediction = self.service.predict(request, options, lora_weights, lora_scale)
        for key, value in prediction.metrics.items():
            self.record_metric(key, value)
        return [Path(p) for p in prediction.paths]
