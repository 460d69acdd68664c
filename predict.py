"""Stable Diffusion XL 1.0 (base + refiner) as a Cog predictor.

This file is the API's specification: the inputs, their bounds and defaults. The work is done in the
sdxl_cog package. Input names and defaults follow stability-ai/sdxl on Replicate, so its users can
switch without changing their requests.
"""

from cog import BasePredictor, Input, Path

from sdxl_cog.config import Settings
from sdxl_cog.inputs.control import ControlInput
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
CONTROL_TYPES = ["none", "canny", "depth", "pose", "lineart", "soft_edge", "normal", "segmentation", "tile"]


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
        controlnet_1: str = Input(
            description="ControlNet 1: what controlnet_1_image guides (none: off). Which baked model serves each type, and what the image lacks, is checked when the request runs.",
            default="none",
            choices=CONTROL_TYPES,
        ),
        controlnet_1_image: Path | None = Input(
            description="ControlNet 1's image (a data: URI or an http(s) URL), fitted to the output size as image is: a photo to preprocess, or a ready control map.",
            default=None,
        ),
        controlnet_1_preprocess: bool = Input(
            description="Make the control map from controlnet_1_image in the server (canny: OpenCV edges; depth: the baked depth estimator; tile: the image itself). Other types take a ready map: set false.",
            default=True,
        ),
        controlnet_1_conditioning_scale: float = Input(
            description="How strongly ControlNet 1 guides the image (0 = not at all).", default=0.75, ge=0, le=4
        ),
        controlnet_1_start: float = Input(
            description="Fraction of the steps at which ControlNet 1 starts guiding.", default=0.0, ge=0, le=1
        ),
        controlnet_1_end: float = Input(
            description="Fraction of the steps at which ControlNet 1 stops guiding.", default=1.0, ge=0, le=1
        ),
        controlnet_2: str = Input(
            description="ControlNet 2: what controlnet_2_image guides (none: off). Which baked model serves each type, and what the image lacks, is checked when the request runs.",
            default="none",
            choices=CONTROL_TYPES,
        ),
        controlnet_2_image: Path | None = Input(
            description="ControlNet 2's image (a data: URI or an http(s) URL), fitted to the output size as image is: a photo to preprocess, or a ready control map.",
            default=None,
        ),
        controlnet_2_preprocess: bool = Input(
            description="Make the control map from controlnet_2_image in the server (canny: OpenCV edges; depth: the baked depth estimator; tile: the image itself). Other types take a ready map: set false.",
            default=True,
        ),
        controlnet_2_conditioning_scale: float = Input(
            description="How strongly ControlNet 2 guides the image (0 = not at all).", default=0.75, ge=0, le=4
        ),
        controlnet_2_start: float = Input(
            description="Fraction of the steps at which ControlNet 2 starts guiding.", default=0.0, ge=0, le=1
        ),
        controlnet_2_end: float = Input(
            description="Fraction of the steps at which ControlNet 2 stops guiding.", default=1.0, ge=0, le=1
        ),
        controlnet_3: str = Input(
            description="ControlNet 3: what controlnet_3_image guides (none: off). Which baked model serves each type, and what the image lacks, is checked when the request runs.",
            default="none",
            choices=CONTROL_TYPES,
        ),
        controlnet_3_image: Path | None = Input(
            description="ControlNet 3's image (a data: URI or an http(s) URL), fitted to the output size as image is: a photo to preprocess, or a ready control map.",
            default=None,
        ),
        controlnet_3_preprocess: bool = Input(
            description="Make the control map from controlnet_3_image in the server (canny: OpenCV edges; depth: the baked depth estimator; tile: the image itself). Other types take a ready map: set false.",
            default=True,
        ),
        controlnet_3_conditioning_scale: float = Input(
            description="How strongly ControlNet 3 guides the image (0 = not at all).", default=0.75, ge=0, le=4
        ),
        controlnet_3_start: float = Input(
            description="Fraction of the steps at which ControlNet 3 starts guiding.", default=0.0, ge=0, le=1
        ),
        controlnet_3_end: float = Input(
            description="Fraction of the steps at which ControlNet 3 stops guiding.", default=1.0, ge=0, le=1
        ),
        ip_adapter_image: Path | None = Input(
            description="IP-Adapter image prompt (a data: URI or an http(s) URL): its style and content guide the image beside the text prompt.",
            default=None,
        ),
        ip_adapter_scale: float = Input(
            description="How strongly ip_adapter_image guides the image (0 = not at all).", default=0.6, ge=0, le=1
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
            controls=[
                ControlInput(
                    controlnet_1,
                    controlnet_1_image,
                    controlnet_1_preprocess,
                    controlnet_1_conditioning_scale,
                    controlnet_1_start,
                    controlnet_1_end,
                ),
                ControlInput(
                    controlnet_2,
                    controlnet_2_image,
                    controlnet_2_preprocess,
                    controlnet_2_conditioning_scale,
                    controlnet_2_start,
                    controlnet_2_end,
                ),
                ControlInput(
                    controlnet_3,
                    controlnet_3_image,
                    controlnet_3_preprocess,
                    controlnet_3_conditioning_scale,
                    controlnet_3_start,
                    controlnet_3_end,
                ),
            ],
            ip_adapter_image=ip_adapter_image,
            ip_adapter_scale=ip_adapter_scale,
            profile=self.service.profile(model),
            control_models=self.service.control_models,
        )
        options = OutputOptions(output_format, output_quality, apply_watermark, safety_check=not disable_safety_checker)
        prediction = self.service.predict(request, options, lora_weights, lora_scale)
        for key, value in prediction.metrics.items():
            self.record_metric(key, value)
        return [Path(p) for p in prediction.paths]
