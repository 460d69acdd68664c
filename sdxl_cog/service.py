"""The predictor's engine: what setup() loads and what one prediction does, end to end, independent of
Cog so that tests and benchmarks can drive it directly."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_cog.checkpoints.checkpoint import Checkpoint
from sdxl_cog.checkpoints.loading import Pipelines, load_weights
from sdxl_cog.checkpoints.registry import Checkpoints
from sdxl_cog.config import Settings
from sdxl_cog.control.models import ControlModels
from sdxl_cog.device import compilation
from sdxl_cog.device.health import DeviceHealth
from sdxl_cog.device.memory import MemoryBudget, PeakMemoryMeter, gpu_capacity, out_of_memory_error, release_memory
from sdxl_cog.errors import InputError
from sdxl_cog.generation.generate import generate
from sdxl_cog.generation.prompts import check_prompt_lengths
from sdxl_cog.generation.warmup import warm_up
from sdxl_cog.generation_parameters import a1111_fields
from sdxl_cog.inputs.request import GenerationRequest
from sdxl_cog.inputs.uploads import claim_input_dir, sweep_stale_inputs
from sdxl_cog.outputs.directory import OutputDirectory
from sdxl_cog.outputs.encoder import BackgroundEncoder
from sdxl_cog.outputs.metadata import parameters_text
from sdxl_cog.weights.profiles import Profile


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
    def __init__(self, settings: Settings, pipelines: Pipelines | None = None):
        """`pipelines`: modules already in memory (bench/gpu_check.py synthesizes them); None: read from
        settings.weights_dir."""
        self.settings = settings
        self.weights = load_weights(settings, pipelines)
        if self.weights.compiled is not None:
            # SDXL_COMPILE: compiled now, so that no request pays for it (generation/warmup.py).
            self.weights.load_seconds["warmup"] = warm_up(self.weights, settings.compile_sizes, settings.device)
        self.outputs = OutputDirectory(settings.output_dir, settings.output_keep)
        claim_input_dir(settings.input_dir)
        self.budget = MemoryBudget(gpu_capacity(settings.device), self.weights.placement.peak_bytes)
        self.gpu_memory = PeakMemoryMeter.for_device(settings.device)
        self.health = DeviceHealth.for_device(settings.device)  # what the predictor's healthcheck() reports

    @property
    def checkpoints(self) -> Checkpoints:
        return self.weights.checkpoints

    @property
    def control_models(self) -> ControlModels:
        """The baked ControlNets, IP-Adapter and depth estimator: build_request refuses what they cannot serve before
        it reads any image."""
        return self.weights.control

    def profile(self, model: str | None) -> Profile:
        """The defaults of the checkpoint `model` names (None: the default one); InputError if there is none."""
        return self.checkpoints.resolve(model).profile

    def predict(
        self, req: GenerationRequest, options: OutputOptions, lora: str | None, lora_scale: float
    ) -> Prediction:
        self.settings.prediction_marker.touch()  # for the liveness probe: a prediction did start
        checkpoint = self.checkpoints.resolve(req.model)
        prompt_tokens = check_prompt_lengths(self._tokenizers(checkpoint, req), req.prompt, req.negative_prompt)
        self.weights.control.check(req.controls, req.image_prompt is not None)
        self.budget.check(req, prompt_tokens)
        if lora and not req.refine.runs_base:
            # A LoRA adapts the base model, which refiner_only never runs: refuse rather than ignore it.
            raise InputError("lora_weights applies to the base model, which refine=refiner_only does not run: drop it.")
        started = time.perf_counter()
        sweep_stale_inputs()
        self.gpu_memory.start()
        directory, tag = self.outputs.start_prediction()
        print(f"Seeds: {list(req.seeds)} ({req.mode}, {req.width}x{req.height}, {req.scheduler})", flush=True)
        texts = [
            parameters_text(
                req.prompt,
                req.negative_prompt,
                a1111_fields(req, seed, lora, lora_scale, checkpoint, self.weights.control),
            )
            for seed in req.seeds
        ]
        out_of_memory = False
        try:
            load_seconds = self.checkpoints.activate(checkpoint)
            checkpoint.loras.activate(lora, lora_scale)
            # Each image is encoded in the background as soon as it is ready, while the next one decodes.
            with (
                self._compiled_stance(lora is not None),
                BackgroundEncoder(texts, directory, tag, options.output_format, options.output_quality) as encoder,
            ):
                result = generate(
                    self.weights,
                    checkpoint.model,
                    req,
                    self.settings.device,
                    options.safety_check,
                    options.apply_watermark,
                    encoder.submit,
                    encoder.stream,
                )
                last_image_ready = time.perf_counter()
                paths = encoder.wait()
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as error:
            self.health.record(error)  # a sticky CUDA error: the GPU is lost, and healthcheck() says so from now on
            raise
        finally:
            # A request's LoRA never outlives it, whether it succeeded, failed or was cancelled.
            checkpoint.loras.deactivate()
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
        if load_seconds is not None:
            timings["model_load"] = load_seconds
        # coglet uploads or returns the files after predict(); should that fail, its error is all the
        # client gets. These metrics still arrive with it: the seeds regenerate the images exactly, and
        # the names find them in SDXL_OUTPUT_DIR, kept for the next output_keep predictions.
        metrics = {
            "model": checkpoint.name,
            "seeds": list(req.seeds),
            "output_files": [f"{tag}/{p.name}" for p in paths],
            "nsfw_flagged": result.nsfw_flags,
            **{f"{stage}_steps": n for stage, n in result.steps.items()},
            **{f"{phase}_time": round(seconds, 4) for phase, seconds in timings.items()},
            **self.gpu_memory.metrics(),
            # The inputs left out that the model's profile filled in (dotted keys nest in Cog's metrics).
            **{f"model_defaults.{name}": value for name, value in req.profile_defaults.items()},
        }
        return Prediction(paths, metrics)

    def _compiled_stance(self, lora: bool) -> AbstractContextManager:
        """With SDXL_COMPILE: the warmed sizes run compiled, anything else (and a LoRA) uncompiled; nothing compiles."""
        return compilation.serving(lora) if self.weights.compiled is not None else nullcontext()

    def _tokenizers(self, checkpoint: Checkpoint, req: GenerationRequest) -> list:
        """The tokenizers of the stages this request runs: the prompt must fit each of them."""
        tokenizers = checkpoint.model.tokenizers() if req.refine.runs_base else []
        return tokenizers + (self.weights.refiner.tokenizers() if req.refine.runs_refiner else [])
