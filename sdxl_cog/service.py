"""The predictor's engine: what setup() loads and what one prediction does, end to end, independent of
Cog so that tests and benchmarks can drive it directly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Settings
from .generate import generate
from .lora import LoraAdapters
from .memory import MemoryBudget, gpu_capacity, out_of_memory_error, release_memory
from .outputs import BackgroundEncoder, OutputDirectory, parameters_text
from .pipelines import load_models, model_name
from .prompts import check_prompt_lengths
from .request import GenerationRequest
from .schedulers import SCHEDULERS
from .uploads import claim_input_dir, sweep_stale_inputs


@dataclass(frozen=True)
class OutputOptions:
    output_format: str
    output_quality: int
    apply_watermark: bool
    safety_check: bool


@dataclass
class Prediction:
    paths: list[Path]
    metrics: dict[str, object]


class SDXLService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = load_models(settings)
        self.model_name = model_name(self.models.manifest)
        self.loras = LoraAdapters(self.models.base_pipeline, settings)
        self.outputs = OutputDirectory(settings.output_dir, settings.output_keep)
        claim_input_dir(settings.input_dir)
        self.budget = MemoryBudget(gpu_capacity(settings.device), self.models.placement.peak_bytes)

    def predict(
        self, req: GenerationRequest, options: OutputOptions, lora: str | None, lora_scale: float
    ) -> Prediction:
        self.settings.prediction_marker.touch()  # for the liveness probe: a prediction did start
        prompt_tokens = check_prompt_lengths(self._tokenizers(), req.prompt, req.negative_prompt)
        self.budget.check(req, prompt_tokens)
        started = time.perf_counter()
        sweep_stale_inputs()
        directory, tag = self.outputs.start_prediction()
        print(f"Seeds: {list(req.seeds)} ({req.mode}, {req.width}x{req.height}, {req.scheduler})", flush=True)
        texts = [
            parameters_text(req.prompt, req.negative_prompt, self._fields(req, seed, lora, lora_scale))
            for seed in req.seeds
        ]
        out_of_memory = False
        try:
            self.loras.activate(lora, lora_scale)
            # Each image is encoded in the background as soon as it is ready, while the next one decodes.
            with BackgroundEncoder(texts, directory, tag, options.output_format, options.output_quality) as encoder:
                result = generate(
                    self.models,
                    req,
                    self.settings.device,
                    options.safety_check,
                    options.apply_watermark,
                    encoder.submit,
                )
                last_image_ready = time.perf_counter()
                paths = encoder.wait()
        except torch.OutOfMemoryError:
            out_of_memory = True
        finally:
            # A request's LoRA never outlives it, whether it succeeded, failed or was cancelled.
            self.loras.deactivate()
        if out_of_memory:
            # Outside the except block, so the failed request's tensors are no longer referenced.
            release_memory(self.settings.device)
            raise out_of_memory_error(req, prompt_tokens)
        for i, flagged in enumerate(result.nsfw_flags):
            if flagged:
                print(
                    f"Output {i} (seed {req.seeds[i]}) was flagged by the safety checker and replaced by a black image."
                )
        # What encoding added to the request: the wait for the last files once the last image was ready.
        timings = {**result.timings, "image_encoding": time.perf_counter() - last_image_ready}
        timings["total"] = time.perf_counter() - started
        print("Timings: " + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()), flush=True)
        # coglet uploads or returns the files after predict(); should that fail, its error is all the
        # client gets. These metrics still arrive with it: the seeds regenerate the images exactly, and
        # the names find them in SDXL_OUTPUT_DIR, kept for the next output_keep predictions.
        metrics = {
            "seeds": list(req.seeds),
            "output_files": [f"{tag}/{p.name}" for p in paths],
            "nsfw_flagged": result.nsfw_flags,
            **{f"{stage}_steps": n for stage, n in result.steps.items()},
            **{f"{phase}_time": round(seconds, 4) for phase, seconds in timings.items()},
        }
        return Prediction(paths, metrics)

    def _tokenizers(self) -> list:
        components = self.models.base.components
        return [components[name] for name in ("tokenizer", "tokenizer_2") if components.get(name) is not None]

    def _fields(self, req: GenerationRequest, seed: int, lora: str | None, lora_scale: float) -> dict[str, object]:
        """The A1111-style generation parameters embedded in each image."""
        fields: dict[str, object] = {
            "Steps": req.num_inference_steps,
            "Sampler": SCHEDULERS[req.scheduler].a1111_name,
            "Schedule": req.scheduler,
            "CFG scale": req.guidance_scale,
            "Seed": seed,
            "Size": f"{req.width}x{req.height}",
            "Model": self.model_name,
        }
        if req.image is not None:
            fields["Denoising strength"] = req.prompt_strength
        if req.refine == "expert_ensemble_refiner":
            fields.update({"Refiner": "expert_ensemble_refiner", "Refiner switch at": req.high_noise_frac})
        elif req.refine == "base_image_refiner":
            fields.update(
                {
                    "Refiner": "base_image_refiner",
                    "Refiner steps": req.refine_steps,
                    "Refiner strength": req.refine_strength,
                }
            )
        if lora:
            fields.update({"Lora": lora.rstrip("/").rsplit("/", 1)[-1], "Lora scale": lora_scale})
        return fields
