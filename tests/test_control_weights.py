"""The stock diffusers ControlNet, ControlNet-Union and IP-Adapter pipelines on the tiny synthetic SDXL weights and the
tiny control weights (devtools/synthetic_control.py), every model loaded by its real loader from a local
folder while the network is refused: what a control does, and what a scale of 0 leaves, bit for bit.

These pin the library behaviour the control feature is to build on; the engine is not involved yet. Images are
compared as the pipelines' float arrays: "equal" is exact, "differs" is by more than VISIBLE."""

from __future__ import annotations

import hashlib
import inspect
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModelForDepthEstimation, CLIPVisionModelWithProjection

from devtools import synthetic_control
from devtools.synthetic import lora_state_dict
from devtools.synthetic_control import (
    CONTROLNET_CANNY_DIR,
    CONTROLNET_DEPTH_DIR,
    CONTROLNET_UNION_DIR,
    DEPTH_ESTIMATOR_DIR,
    IP_ADAPTER_DIR,
    IP_ADAPTER_SUBFOLDER,
    IP_ADAPTER_WEIGHT_NAME,
    UNION_CONTROL_TYPES,
    make_control_weights,
)
from sdxl_cog.generation.prompts import encode_prompts
from tests.conftest import TEST_SIDE

DTYPE = torch.float32  # on the CPU; explicit, as in test_synthetic_weights
STEPS = 2  # the fewest that still show a control window: 0.5 ends control after the first step
WINDOW_STEPS = 4  # for start/end fractions of a quarter
SEED = 7
COMMON = dict(prompt="a red fox in the snow", num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
# More than a 2-level change of some 8-bit pixel: what the tiny models' controls do is 10 times that or more.
VISIBLE = 2 / 255
UNION_CANNY, UNION_DEPTH, UNION_REPAINT = 3, 1, 7  # xinsir's control_mode indices (CONTROL_NOTES.md)

# The files of each real release that the loaders read.
RELEASE_FILES = {
    CONTROLNET_CANNY_DIR: {"config.json", "diffusion_pytorch_model.fp16.safetensors"},
    CONTROLNET_DEPTH_DIR: {"config.json", "diffusion_pytorch_model.fp16.safetensors"},
    CONTROLNET_UNION_DIR: {"config.json", "diffusion_pytorch_model.fp16.safetensors"},
    IP_ADAPTER_DIR: {
        "sdxl_models/ip-adapter_sdxl.safetensors",
        "sdxl_models/image_encoder/config.json",
        "sdxl_models/image_encoder/model.safetensors",
    },
    DEPTH_ESTIMATOR_DIR: {"config.json", "model.safetensors", "preprocessor_config.json"},
}


@contextmanager
def refused_network():
    """Every connection or name lookup fails, and is recorded: a loader that caught the error is still seen."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access refused by the test")

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "getaddrinfo")):
            patch.setattr(owner, name, refuse)
        yield attempts


def load_base(weights: Path) -> StableDiffusionXLPipeline:
    vae = AutoencoderKL.from_pretrained(weights / "vae", dtype=DTYPE, variant="fp16")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        weights / "base", vae=vae, variant="fp16", add_watermarker=False, dtype=DTYPE
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs) -> np.ndarray:
    """One image, (H, W, 3) floats in [0, 1], from a fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{**COMMON, **kwargs}, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) > VISIBLE


def noise_image(seed: int, size=(TEST_SIDE, TEST_SIDE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def right_half_mask() -> Image.Image:
    mask = np.zeros((TEST_SIDE, TEST_SIDE), dtype=np.uint8)
    mask[:, TEST_SIDE // 2 :] = 255
    return Image.fromarray(mask)


INPUTS = {
    "control": noise_image(1),
    "other_control": noise_image(2),
    "source": noise_image(3),
    "mask": right_half_mask(),
    "ip": noise_image(4, size=(200, 150)),  # not square: the image encoder's processor resizes and crops
}
SIZE = dict(width=TEST_SIDE, height=TEST_SIDE)
# Where an image is started from: 0.8 of STEPS runs one step. The inpaint pipelines are given the size too: without
# it the plain one makes 1024x1024 (the UNet's sample size), not the image's size.
IMG2IMG = dict(image=INPUTS["source"], strength=0.8)
INPAINT = dict(image=INPUTS["source"], mask_image=INPUTS["mask"], strength=0.8, **SIZE)


@dataclass
class Models:
    base: StableDiffusionXLPipeline
    canny: ControlNetModel
    depth: ControlNetModel
    union: ControlNetUnionModel
    network_attempts: list
    made: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def components(self) -> dict:
        return self.base.components

    def controlnet_pipe(self, controlnet=None) -> StableDiffusionXLControlNetPipeline:
        return StableDiffusionXLControlNetPipeline(**self.components, controlnet=controlnet or self.canny)

    def union_pipe(self, controlnet=None) -> StableDiffusionXLControlNetUnionPipeline:
        return StableDiffusionXLControlNetUnionPipeline(**self.components, controlnet=controlnet or self.union)

    def image(self, name: str) -> np.ndarray:
        """An image several tests compare with (REFERENCES), made once per module."""
        if name not in self.made:
            self.made[name] = REFERENCES[name](self)
        return self.made[name]


REFERENCES = {
    # The stock SDXL pipelines, without control.
    "txt2img": lambda m: generate(StableDiffusionXLPipeline(**m.components), **SIZE),
    "img2img": lambda m: generate(StableDiffusionXLImg2ImgPipeline(**m.components), **IMG2IMG),
    "inpaint": lambda m: generate(StableDiffusionXLInpaintPipeline(**m.components), **INPAINT),
    # One control at scale 1 (text-to-image takes the control as image=, the union pipelines as control_image=).
    "canny": lambda m: generate(m.controlnet_pipe(), image=INPUTS["control"], **SIZE),
    "union_canny": lambda m: generate(
        m.union_pipe(), control_image=[INPUTS["control"]], control_mode=[UNION_CANNY], **SIZE
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models are streams of small operations: more intra-op threads only add synchronisation, and on a
    busy machine a waiting OpenMP thread spins. Measured on the shared 2-core development machine: a 2-step
    generation took 0.08 s of CPU with 1 thread, 0.9 to 2.0 s with 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def control_weights(tmp_path_factory) -> dict[str, Path]:
    return make_control_weights(tmp_path_factory.mktemp("control"))


@pytest.fixture(scope="module")
def models(tiny_weights, control_weights) -> Models:
    with refused_network() as attempts:
        base = load_base(tiny_weights)
        controlnets = [
            ControlNetModel.from_pretrained(control_weights[name], variant="fp16", dtype=DTYPE)
            for name in (CONTROLNET_CANNY_DIR, CONTROLNET_DEPTH_DIR)
        ]
        union = ControlNetUnionModel.from_pretrained(control_weights[CONTROLNET_UNION_DIR], variant="fp16", dtype=DTYPE)
    return Models(base, *controlnets, union, attempts)


# --- The weights ------------------------------------------------------------------------------------------------


def test_every_model_is_written_in_its_release_layout(control_weights):
    for name, folder in control_weights.items():
        written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert written == RELEASE_FILES[name], name
    with safe_open(control_weights[IP_ADAPTER_DIR] / IP_ADAPTER_SUBFOLDER / IP_ADAPTER_WEIGHT_NAME, "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"image_proj", "ip_adapter"}


def test_same_seed_same_bytes(control_weights, tmp_path):
    def digests(folders: dict[str, Path]) -> dict[str, str]:
        return {
            f"{name}/{p.relative_to(folder)}": hashlib.sha256(p.read_bytes()).hexdigest()
            for name, folder in folders.items()
            for p in folder.rglob("*")
            if p.is_file()
        }

    assert digests(make_control_weights(tmp_path, seed=0)) == digests(control_weights)


def test_controlnets_load_offline_and_fit_the_base_unet(models):
    assert models.network_attempts == []
    unet = models.base.unet.config
    for controlnet in (models.canny, models.depth, models.union):
        for key in ("block_out_channels", "cross_attention_dim", "transformer_layers_per_block"):
            assert controlnet.config[key] == unet[key], key
        assert controlnet.config.projection_class_embeddings_input_dim == unet.projection_class_embeddings_input_dim
    assert models.union.config.num_control_type == UNION_CONTROL_TYPES
    assert not torch.equal(models.canny.controlnet_mid_block.weight, models.depth.controlnet_mid_block.weight)


def test_depth_estimator_loads_offline_with_the_published_preprocessor(control_weights):
    with refused_network() as attempts:
        model = AutoModelForDepthEstimation.from_pretrained(control_weights[DEPTH_ESTIMATOR_DIR])
        processor = AutoImageProcessor.from_pretrained(control_weights[DEPTH_ESTIMATOR_DIR])
    assert attempts == []
    assert type(model).__name__ == "DepthAnythingForDepthEstimation"
    pixels = processor(images=noise_image(5, size=(160, 96)), return_tensors="pt")["pixel_values"]
    # DPT's resize: one side becomes 518 (the one whose scale is nearer 1), the other keeps the aspect ratio, and both
    # are rounded to multiples of the 14-pixel patch.
    height, width = pixels.shape[-2:]
    assert 518 in (height, width) and height % 14 == 0 and width % 14 == 0
    assert abs(width / height - 160 / 96) < 14 / min(height, width)
    assert model(pixel_values=pixels).predicted_depth.shape[-2:] == pixels.shape[-2:]


# The published sizes of the real files (bytes), and how close the full-size architecture's tensors must come: the
# union model and the adapter to within their safetensors header, the others to the figure Hugging Face shows.
PUBLISHED_BYTES = {
    "controlnet": (2.5e9, 0.02),  # diffusers/controlnet-canny-sdxl-1.0, "2.5 GB"
    "controlnet_union": (2_513_342_408, 1e-4),  # xinsir's diffusion_pytorch_model_promax.safetensors
    "ip_adapter": (702_585_376, 1e-4),  # h94/IP-Adapter sdxl_models/ip-adapter_sdxl.safetensors
    "image_encoder": (3.69e9, 0.002),  # sdxl_models/image_encoder/model.safetensors, "3.69 GB"
    "depth": (99.2e6, 0.002),  # Depth-Anything-V2-Small-hf model.safetensors (fp32), "99.2 MB"
}


def test_full_size_architectures_match_the_published_files():
    sizes = synthetic_control.tensor_bytes("full")
    for name, (published, tolerance) in PUBLISHED_BYTES.items():
        assert abs(sizes[name] - published) <= tolerance * published, (name, sizes[name])


# --- ControlNet ---------------------------------------------------------------------------------------------------


def test_controlnet_scale_zero_is_the_plain_image_bit_for_bit(models):
    off = generate(models.controlnet_pipe(), image=INPUTS["control"], controlnet_conditioning_scale=0.0, **SIZE)
    # The ControlNet still runs; its residuals times 0 are added to the UNet's, which leaves them exactly.
    assert np.array_equal(off, models.image("txt2img"))
    assert differs(models.image("canny"), off)
    other = generate(models.controlnet_pipe(), image=INPUTS["other_control"], **SIZE)
    assert differs(other, models.image("canny"))  # the control image, not only the ControlNet, shapes the result


def test_control_guidance_start_and_end_pick_the_controlled_steps(models):
    scales = []
    hook = models.canny.register_forward_pre_hook(
        lambda module, args, kwargs: scales.append(kwargs["conditioning_scale"]), with_kwargs=True
    )
    try:
        first_half = generate(models.controlnet_pipe(), image=INPUTS["control"], control_guidance_end=0.5, **SIZE)
        first_scales, scales[:] = list(scales), []
        second_half = generate(models.controlnet_pipe(), image=INPUTS["control"], control_guidance_start=0.5, **SIZE)
    finally:
        hook.remove()
    # Step i of N is controlled when start <= i/N and (i+1)/N <= end; the others run the ControlNet at scale 0.
    assert (first_scales, scales) == ([1.0, 0.0], [0.0, 1.0])
    # The first step's control is most of what a control does; the last step's is little, but not nothing.
    assert differs(first_half, models.image("txt2img")) and differs(second_half, models.image("canny"))
    assert not np.array_equal(first_half, models.image("canny"))
    assert not np.array_equal(second_half, models.image("txt2img"))


def test_two_controlnets_add_up_and_a_zero_scale_drops_one_exactly(models):
    both = models.controlnet_pipe([models.canny, models.depth])
    controls = [INPUTS["control"], INPUTS["other_control"]]
    assert differs(generate(both, image=controls, **SIZE), models.image("canny"))
    canny_alone = generate(both, image=controls, controlnet_conditioning_scale=[1.0, 0.0], **SIZE)
    assert np.array_equal(canny_alone, models.image("canny"))


@pytest.mark.parametrize(
    ("cls", "mode", "inputs"),
    [
        (StableDiffusionXLControlNetImg2ImgPipeline, "img2img", IMG2IMG),
        (StableDiffusionXLControlNetInpaintPipeline, "inpaint", INPAINT),
        (StableDiffusionXLControlNetUnionImg2ImgPipeline, "img2img", IMG2IMG),
        (StableDiffusionXLControlNetUnionInpaintPipeline, "inpaint", INPAINT),
    ],
    ids=["controlnet-img2img", "controlnet-inpaint", "union-img2img", "union-inpaint"],
)
def test_img2img_and_inpaint_with_control_at_scale_zero_are_the_plain_image(models, cls, mode, inputs):
    union = "Union" in cls.__name__
    pipe = cls(**models.components, controlnet=models.union if union else models.canny)
    # These pipelines take the control as control_image; the union ones a list, with a control_mode each (repaint
    # is the ProMax mode made for inpainting).
    control = (
        dict(control_image=[INPUTS["control"]], control_mode=[UNION_REPAINT if mode == "inpaint" else UNION_CANNY])
        if union
        else dict(control_image=INPUTS["control"])
    )
    off = generate(pipe, controlnet_conditioning_scale=0.0, **inputs, **control)
    assert np.array_equal(off, models.image(mode))
    assert differs(generate(pipe, **inputs, **control), off)


def test_controlnet_img2img_pipelines_have_no_denoising_end():
    """The base half of the refiner's expert ensemble needs denoising_end; these two swallow it in **kwargs."""
    for cls in (StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetUnionImg2ImgPipeline):
        assert "denoising_end" not in inspect.signature(cls.__call__).parameters
    for cls in (StableDiffusionXLControlNetPipeline, StableDiffusionXLControlNetInpaintPipeline):
        assert "denoising_end" in inspect.signature(cls.__call__).parameters


def test_controlnet_and_ip_adapter_do_not_fit_the_refiner(tiny_weights, models, control_weights):
    base = models.base
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_weights / "refiner",
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        vae=base.vae,
        variant="fp16",
        add_watermarker=False,
        dtype=DTYPE,
    )
    pipe = StableDiffusionXLControlNetImg2ImgPipeline(**refiner.components, controlnet=models.canny)
    # The refiner's added embedding has 5 micro-conditioning numbers, the ControlNet's (the base's) 6.
    with pytest.raises(ValueError, match="added time embedding"):
        generate(pipe, control_image=INPUTS["control"], **IMG2IMG)
    # The adapter's projections are for the base's cross-attention width.
    with pytest.raises(ValueError, match="expected shape"):
        load_ip_adapter(refiner, control_weights)


# --- ControlNet-Union ---------------------------------------------------------------------------------------------


def test_union_one_mode_scale_zero_is_the_plain_image(models):
    off = generate(
        models.union_pipe(),
        control_image=[INPUTS["control"]],
        control_mode=[UNION_CANNY],
        controlnet_conditioning_scale=0.0,
        **SIZE,
    )
    assert np.array_equal(off, models.image("txt2img"))
    assert differs(models.image("union_canny"), off)


def test_union_modes_in_one_call_are_mixed_inside_and_zero_scales_do_not_turn_them_off(models):
    """Several modes in one ControlNetUnionModel call: each scale weights its condition inside the model, and the
    model's output is not scaled, so scales of 0 still add residuals (of the unconditioned model) to the UNet."""
    controls, modes = [INPUTS["control"], INPUTS["other_control"]], [UNION_CANNY, UNION_DEPTH]
    two = generate(models.union_pipe(), control_image=controls, control_mode=modes, **SIZE)
    zeros = generate(
        models.union_pipe(),
        control_image=controls,
        control_mode=modes,
        controlnet_conditioning_scale=[0.0, 0.0],
        **SIZE,
    )
    assert differs(two, models.image("union_canny"))
    assert differs(zeros, models.image("txt2img"))


def test_union_modes_as_separate_nets_add_up_and_a_zero_scale_drops_one_exactly(models):
    """MultiControlNetUnionModel runs the union model once per mode and skips a mode whose scale is 0."""
    pipe = models.union_pipe(MultiControlNetUnionModel([models.union, models.union]))
    controls, modes = [INPUTS["control"], INPUTS["other_control"]], [UNION_CANNY, UNION_DEPTH]
    one = generate(pipe, control_image=controls, control_mode=modes, controlnet_conditioning_scale=[1.0, 0.0], **SIZE)
    none = generate(pipe, control_image=controls, control_mode=modes, controlnet_conditioning_scale=[0.0, 0.0], **SIZE)
    assert np.array_equal(one, models.image("union_canny"))
    assert np.array_equal(none, models.image("txt2img"))


# --- IP-Adapter ---------------------------------------------------------------------------------------------------


def load_ip_adapter(pipe, control_weights) -> None:
    # The image encoder is found at SUBFOLDER/image_encoder (image_encoder_folder's default, "image_encoder").
    pipe.load_ip_adapter(
        str(control_weights[IP_ADAPTER_DIR]), subfolder=IP_ADAPTER_SUBFOLDER, weight_name=IP_ADAPTER_WEIGHT_NAME
    )


@dataclass
class Adapted:
    pipe: StableDiffusionXLPipeline  # its own modules, loaded from the same files, with the adapter in its UNet
    network_attempts: list
    image: np.ndarray | None = None  # at scale IP_SCALE, made by the first test that needs it

    def with_image_prompt(self) -> np.ndarray:
        if self.image is None:
            self.pipe.set_ip_adapter_scale(IP_SCALE)
            self.image = generate(self.pipe, ip_adapter_image=INPUTS["ip"], **SIZE)
        return self.image


IP_SCALE = 0.6


@pytest.fixture(scope="module")
def adapted(tiny_weights, control_weights) -> Adapted:
    with refused_network() as attempts:
        pipe = load_base(tiny_weights)
        load_ip_adapter(pipe, control_weights)
    return Adapted(pipe, attempts)


def test_ip_adapter_loads_offline_with_its_image_encoder(adapted):
    assert adapted.network_attempts == []
    assert isinstance(adapted.pipe.image_encoder, CLIPVisionModelWithProjection)
    assert adapted.pipe.feature_extractor is not None  # made by load_ip_adapter, sized from the encoder's config
    assert adapted.pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"


def test_ip_adapter_scale_zero_is_the_plain_image_and_the_unet_then_needs_an_image(models, adapted):
    adapted.pipe.set_ip_adapter_scale(0.0)
    off = generate(adapted.pipe, ip_adapter_image=INPUTS["ip"], **SIZE)
    # At scale 0 the adapter's attention is skipped; the rest is the plain computation.
    assert np.array_equal(off, models.image("txt2img"))
    # So a call without an image prompt can pass zero embeddings ([negative, positive]) instead of running the encoder.
    zeros = [torch.zeros(2, 1, adapted.pipe.image_encoder.config.projection_dim)]
    assert np.array_equal(generate(adapted.pipe, ip_adapter_image_embeds=zeros, **SIZE), off)
    assert differs(adapted.with_image_prompt(), off)
    # Loading the adapter changed the UNet, for every pipeline that shares it: each call must bring image embeddings.
    with pytest.raises(ValueError, match="image_embeds"):
        generate(adapted.pipe, **SIZE)


def test_ip_adapter_takes_precomputed_embeddings_and_the_engines_own_prompt_embeddings(adapted):
    pipe = adapted.pipe
    # Per adapter, [negative, positive] image embeddings under guidance; the negative one is zeros.
    embeds = pipe.prepare_ip_adapter_image_embeds(INPUTS["ip"], None, "cpu", 1, True)
    assert [tuple(e.shape[:2]) for e in embeds] == [(2, 1)]
    assert not embeds[0][0].any()
    prompts = encode_prompts(
        [pipe.tokenizer, pipe.tokenizer_2],
        [pipe.text_encoder, pipe.text_encoder_2],
        COMMON["prompt"],
        "",
        zero_empty_negative=True,
    )
    pipe.set_ip_adapter_scale(IP_SCALE)
    precomputed = generate(
        pipe, **{**prompts.as_pipeline_kwargs(), "prompt": None}, ip_adapter_image_embeds=embeds, **SIZE
    )
    assert np.array_equal(precomputed, adapted.with_image_prompt())


def test_ip_adapter_with_controlnet(models, adapted):
    pipe = StableDiffusionXLControlNetPipeline(**adapted.pipe.components, controlnet=models.canny)
    assert pipe.image_encoder is adapted.pipe.image_encoder  # the components carry the adapter's encoder
    adapted.pipe.set_ip_adapter_scale(0.0)
    idle = generate(pipe, image=INPUTS["control"], ip_adapter_image=INPUTS["ip"], **SIZE)
    adapted.pipe.set_ip_adapter_scale(IP_SCALE)
    both = generate(pipe, image=INPUTS["control"], ip_adapter_image=INPUTS["ip"], **SIZE)
    assert np.array_equal(idle, models.image("canny"))
    assert differs(both, models.image("canny"))


def test_lora_and_ip_adapter_coexist_and_unload_independently(tiny_weights, control_weights, models):
    pipe = load_base(tiny_weights)
    pipe.load_lora_weights({f"unet.{k}": v for k, v in lora_state_dict(tiny_weights).items()}, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.6])
    load_ip_adapter(pipe, control_weights)  # after the LoRA, whose PEFT layers sit inside the attention modules
    pipe.set_ip_adapter_scale(0.0)
    lora_with_idle_adapter = generate(pipe, ip_adapter_image=INPUTS["ip"], **SIZE)
    pipe.unload_ip_adapter()  # back to plain attention processors; the PEFT layers stay
    assert pipe.unet.config.encoder_hid_dim_type is None
    lora_only = generate(pipe, **SIZE)
    assert np.array_equal(lora_with_idle_adapter, lora_only)
    assert differs(lora_only, models.image("txt2img"))
