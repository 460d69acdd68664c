"""Stable Diffusion XL 1.0 (base + refiner) as a Cog predictor.

This file is the API's specification: the inputs, their bounds and defaults. The work is done in the
sdxl_cog package. Input names and defaults follow stability-ai/sdxl on Replicate, so its users can
switch without changing their requests.
"""

from cog import BasePredictor, Input, Path

from sdxl_cog.config import Settings
from sdxl_cog.inputs.request import build_request
from sdxl_cog.service import OutputOptions, SDXLService

# Cog's CLI reads this file without importing it (see sdxl_cog/schema/static_reader.py): every Input()
# argument below is a literal or a name bound to one here, or `cog build` would lose it. The engine's own
# copies of these values (sdxl_cog/config.py, SCHEDULERS, REFINE_MODES, OUTPUT_FORMATS) are checked against
# this file by tests/test_schema.py.
SCHEDULERS = [
    "DDIM",
    "DPMSolverMultistep",
    "HeunDiscrete",
    "KarrasDPM",
    "K_EULER_ANCESTRAL",
    "K_EULER",
    "PNDM",
    "DPM++ 2M Karras",
    "UniPC",
]
REFINE_MODES = ["no_refiner", "expert_ensemble_refiner", "base_image_refiner", "refiner_only"]
OUTPUT_FORMATS = ["png", "jpg", "webp"]


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load base, refiner, VAE and safety checker from weights/ (SDXL_WEIGHTS_DIR) once."""
        self.service = SDXLService(Settings.from_env())

    def healthcheck(self) -> bool:
        """Cog calls this for GET /health-check once setup is done: an exception saying why the GPU cannot
        serve (sdxl_cog/device/health.py) makes the status UNHEALTHY, so that the probes restart the container."""
        self.service.health.check()
        return True

    def predict(
        self,
        prompt: str = Input(
            description="What to draw. Up to 750 tokens; longer than 77 is fine: nothing is truncated.",
            default="An astronaut riding a rainbow unicorn",
            max_length=7500,
        ),
        negative_prompt: str = Input(
            description="What to keep out of the image. Up to 750 tokens.", default="", max_length=7500
        ),
        image: Path | None = Input(
            description="Source image for img2img, for inpainting together with mask, or for refine=refiner_only: a data: URI or an http(s) URL.",
            default=None,
        ),
        mask: Path | None = Input(
            description="Inpainting mask for image (a data: URI or an http(s) URL): black areas are kept exactly, white areas are repainted.",
            default=None,
        ),
        width: int | None = Input(
            description="Output width, a multiple of 8. Default 1024 for text-to-image (or the model's profile: 512 for SDXL-Turbo); with an image, follows the image.",
            default=None,
            ge=128,
            le=2048,
        ),
        height: int | None = Input(
            description="Output height, a multiple of 8. Default 1024 for text-to-image (or the model's profile: 512 for SDXL-Turbo); with an image, follows the image.",
            default=None,
            ge=128,
            le=2048,
        ),
        num_outputs: int = Input(description="Number of images. Image i uses seed + i.", default=1, ge=1, le=4),
        scheduler: str = Input(description="Sampler.", default="K_EULER", choices=SCHEDULERS),
        num_inference_steps: int | None = Input(
            description="Denoising steps. Default: the model's profile (50 for SDXL, 1 for SDXL-Turbo, 4 for SDXL-Lightning).",
            default=None,
            ge=1,
            le=500,
        ),
        guidance_scale: float | None = Input(
            description="Classifier-free guidance scale; 1 or less turns guidance off, as distilled models need. Default: the model's profile (7.5 for SDXL, 0 for SDXL-Turbo and SDXL-Lightning).",
            default=None,
            ge=0,
            le=50,
        ),
        prompt_strength: float = Input(
            description="img2img/inpaint: how much of the source image is replaced (1.0 = all of it).",
            default=0.8,
            ge=0,
            le=1,
        ),
        seed: int | None = Input(
            description="Random seed. Leave blank for a random one; the seeds used are returned in metrics.",
            default=None,
            ge=0,
            le=4294967295,
        ),
        refine: str = Input(
            description="Refiner: none, expert ensemble (base hands over at high_noise_frac), img2img on the base's image, or refiner_only: the refiner alone on the input image (masked: only the white areas).",
            default="no_refiner",
            choices=REFINE_MODES,
        ),
        high_noise_frac: float = Input(
            description="expert_ensemble_refiner: fraction of the steps the base runs.", default=0.8, ge=0, le=1
        ),
        refine_steps: int | None = Input(
            description="base_image_refiner and refiner_only: refiner steps to run. Default: num_inference_steps x refine_strength.",
            default=None,
            ge=1,
            le=500,
        ),
        refine_strength: float = Input(
            description="base_image_refiner and refiner_only: how much noise the refiner adds back before refining.",
            default=0.3,
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
        lora_scale: float = Input(description="LoRA strength (0 = off, 1 = full).", default=0.6, ge=0, le=1),
        output_format: str = Input(
            description="Image file format. PNG is lossless.", default="png", choices=OUTPUT_FORMATS
        ),
        output_quality: int = Input(
            description="jpg/webp quality (webp at 100 is lossless); ignored for png.", default=80, ge=0, le=100
        ),
        model: str | None = Input(
            description="Checkpoint, by the name it was baked under (metrics.model names the one used). Default: the first one baked. The names depend on what this image baked, so they are checked when the request runs: an unknown one fails listing them.",
            default=None,
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
            model=model,
            profile=self.service.profile(model),
        )
        options = OutputOptions(output_format, output_quality, apply_watermark, safety_check=not disable_safety_checker)
        prediction = self.service.predict(request, options, lora_weights, lora_scale)
        for key, value in prediction.metrics.items():
            self.record_metric(key, value)
        return [Path(p) for p in prediction.paths]
