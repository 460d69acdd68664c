"""ControlNet controls and the IP-Adapter image prompt through the engine, on tiny synthetic weights with tiny control
models (devtools/synthetic_control.add_control): each mode equals diffusers' stock ControlNet, ControlNet-Union and
IP-Adapter pipelines on the same modules and seed; a scale of 0 gives exactly the image without; every input
changes what it should; what the image lacks, or the request gets wrong, is refused naming it."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from devtools.synthetic import add_model, lora_state_dict
from devtools.synthetic_control import add_control
from sdxl_cog.control import preprocess
from sdxl_cog.errors import InputError
from sdxl_cog.generation.pipelines import window_over_kept_steps
from sdxl_cog.generation_parameters import control_units
from sdxl_cog.inputs import images
from sdxl_cog.inputs.control import ControlInput
from sdxl_cog.outputs.metadata import read_parameters
from sdxl_cog.service import OutputOptions, SDXLService
from sdxl_cog.weights.control_parts import IP_ADAPTERS
from sdxl_cog.weights.control_types import UNION_CONTROL_MODES
from tests.conftest import TEST_SIDE, half_mask, make_request, max_diff, pixels, source_image

RAW = OutputOptions(output_format="png", output_quality=80, apply_watermark=False, safety_check=False)
STEPS = 3
# Identical arithmetic on the same device: at most the uint8 rounding of two float-to-byte conversions.
TOLERANCE = 1


def control(type_="canny", image=None, preprocess_=False, scale=1.0, start=0.0, end=1.0) -> ControlInput:
    return ControlInput(type_, image, preprocess_, scale, start, end)


def predict(service, controls=(), ip_adapter_image=None, ip_adapter_scale=0.6, **overrides):
    request = make_request(
        controls=list(controls), ip_adapter_image=ip_adapter_image, ip_adapter_scale=ip_adapter_scale, **overrides
    )
    prediction = service.predict(request, RAW, None, 0.6)
    loaded = [Image.open(p) for p in prediction.paths]
    for image in loaded:
        image.load()
    return loaded, prediction.metrics


def image(service, **kwargs) -> Image.Image:
    return predict(service, num_inference_steps=STEPS, seed=7, **kwargs)[0][0]


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> dict[str, Path]:
    """A ready edge map (two rectangles' outlines), a photo-like noise source and a second, different map."""
    folder = tmp_path_factory.mktemp("maps")
    edges = np.zeros((TEST_SIDE, TEST_SIDE, 3), np.uint8)
    edges[20:100, 20] = edges[20:100, 100] = edges[20, 20:100] = edges[100, 20:100] = 255
    other = np.zeros_like(edges)
    other[:, ::16] = 255
    paths = {"edges": folder / "edges.png", "other": folder / "other.png"}
    Image.fromarray(edges).save(paths["edges"])
    Image.fromarray(other).save(paths["other"])
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (TEST_SIDE, TEST_SIDE, 3), dtype=np.uint8)).save(folder / "photo.png")
    paths["photo"] = folder / "photo.png"
    return paths


def _control_service(settings, tiny_weights, tmp_path_factory, name, **baked) -> SDXLService:
    root = Path(shutil.copytree(tiny_weights, tmp_path_factory.mktemp(name) / "weights"))
    add_control(root, **baked)
    return SDXLService(dataclasses.replace(settings, weights_dir=root))


@pytest.fixture(scope="module")
def controlled(settings, tiny_weights, tmp_path_factory) -> SDXLService:
    """Single-type canny and depth ControlNets, the union, the IP-Adapter and the depth estimator."""
    return _control_service(settings, tiny_weights, tmp_path_factory, "controlled")


@pytest.fixture(scope="module")
def union_only(settings, tiny_weights, tmp_path_factory) -> SDXLService:
    return _control_service(
        settings,
        tiny_weights,
        tmp_path_factory,
        "union",
        controlnets=("union",),
        ip_adapter=False,
        depth_estimator=False,
    )


@pytest.fixture(scope="module")
def plain(controlled) -> Image.Image:
    return image(controlled)


def stock(service, cls, **modules):
    base = service.checkpoints.default.model
    pipe = cls(
        **{**base.components, **modules},
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler_config),
        **base.options,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_image(pipe, **kwargs) -> Image.Image:
    return pipe(
        prompt="a red fox in the snow",
        width=TEST_SIDE,
        height=TEST_SIDE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(7)],
        **kwargs,
    ).images[0]


def no_image_prompt(service) -> list[torch.Tensor]:
    """What the engine passes a UNet with the adapter loaded when the request has no image prompt (at scale 0)."""
    return [torch.zeros(2, 1, service.weights.control.ip_adapter.image_encoder.config.projection_dim)]


def controlnet(service, name):
    return next(net.module for net in service.weights.control.controlnets if net.entry.name == name)


def equal(a, b) -> bool:
    return int(np.abs(pixels(a) - pixels(b)).max()) <= TOLERANCE


# --- Parity with diffusers' stock pipelines ---------------------------------------------------------------------


def test_txt2img_with_a_controlnet_is_the_stock_controlnet_pipeline(controlled, maps, plain):
    ours = image(controlled, controls=[control("canny", maps["edges"], scale=0.9)])
    theirs = stock_image(
        stock(controlled, StableDiffusionXLControlNetPipeline, controlnet=controlnet(controlled, "canny")),
        image=Image.open(maps["edges"]).convert("RGB"),
        controlnet_conditioning_scale=0.9,
        ip_adapter_image_embeds=no_image_prompt(controlled),  # the adapter is loaded: zeros at scale 0, as ours
    )
    assert equal(ours, theirs)
    assert max_diff(ours, plain) > 2  # and the control did something


def test_union_txt2img_is_the_stock_union_pipeline(union_only, maps):
    ours = image(union_only, controls=[control("pose", maps["edges"], scale=0.8)])
    theirs = stock_image(
        stock(union_only, StableDiffusionXLControlNetUnionPipeline, controlnet=controlnet(union_only, "union")),
        control_image=[Image.open(maps["edges"]).convert("RGB")],
        control_mode=[UNION_CONTROL_MODES["pose"]],
        controlnet_conditioning_scale=0.8,
    )
    assert equal(ours, theirs)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_with_a_controlnet_are_the_stock_pipelines(controlled, maps, tmp_path, mode):
    source = source_image(tmp_path, (TEST_SIDE, TEST_SIDE))
    mask = half_mask(tmp_path, (TEST_SIDE, TEST_SIDE)) if mode == "inpaint" else None
    ours = image(controlled, image=source, mask=mask, prompt_strength=0.7, controls=[control("depth", maps["edges"])])
    cls = (
        StableDiffusionXLControlNetInpaintPipeline if mode == "inpaint" else StableDiffusionXLControlNetImg2ImgPipeline
    )
    extra = {"mask_image": Image.open(mask).convert("L")} if mask else {}
    theirs = stock_image(
        stock(controlled, cls, controlnet=controlnet(controlled, "depth")),
        image=Image.open(source).convert("RGB"),
        control_image=Image.open(maps["edges"]).convert("RGB"),
        strength=0.7,
        controlnet_conditioning_scale=1.0,
        ip_adapter_image_embeds=no_image_prompt(controlled),
        **extra,
    )
    if mask:  # ours pastes the kept half back exactly; the stock pipeline leaves it to the caller
        theirs = Image.composite(theirs, Image.open(source).convert("RGB"), Image.open(mask).convert("L"))
    assert equal(ours, theirs)


def test_an_image_prompt_is_the_stock_ip_adapter_pipeline(controlled, maps, plain):
    ours = image(controlled, ip_adapter_image=maps["photo"], ip_adapter_scale=0.7)
    pipe = stock(controlled, StableDiffusionXLPipeline)
    pipe.set_ip_adapter_scale(0.7)
    try:
        theirs = stock_image(pipe, ip_adapter_image=Image.open(maps["photo"]).convert("RGB"))
    finally:
        pipe.set_ip_adapter_scale(0.0)
    assert equal(ours, theirs)
    assert max_diff(ours, plain) > 2


# --- What each input does ----------------------------------------------------------------------------------------


def test_scale_zero_gives_exactly_the_image_without(controlled, maps, plain):
    assert max_diff(image(controlled, controls=[control("canny", maps["edges"], scale=0.0)]), plain) == 0
    assert max_diff(image(controlled, ip_adapter_image=maps["photo"], ip_adapter_scale=0.0), plain) == 0


def test_baking_the_control_models_leaves_a_plain_image_within_rounding(service, plain):
    """With the IP-Adapter loaded, diffusers' IP attention processors compute the text attention by another path
    (from a slice of their inputs): the same image within a level of rounding, not bit for bit."""
    assert max_diff(image(service), plain) <= TOLERANCE


def test_two_controls_differ_from_each_alone(controlled, maps):
    edges = image(controlled, controls=[control("canny", maps["edges"])])
    depth = image(controlled, controls=[control("depth", maps["other"])])
    both = image(controlled, controls=[control("canny", maps["edges"]), control("depth", maps["other"])])
    assert max_diff(both, edges) > 2 and max_diff(both, depth) > 2


def test_start_and_end_change_which_steps_are_controlled(controlled, maps, plain):
    whole = image(controlled, controls=[control("canny", maps["edges"])])
    late = image(controlled, controls=[control("canny", maps["edges"], start=0.5)])
    early = image(controlled, controls=[control("canny", maps["edges"], end=0.5)])
    assert len({pixels(i).tobytes() for i in (whole, late, early, plain)}) == 4


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_start_and_end_are_fractions_of_the_whole_schedule_in_every_mode_with_the_refiner(
    controlled, maps, tmp_path, strength
):
    """With the expert ensemble the base runs the first high_noise_frac of the steps, and a control's start and end
    are fractions of all the steps the request runs after prompt_strength (docs/control.md), in img2img as in
    text-to-image and inpainting: the steps guided are read off the ControlNet's conditioning scale per call."""
    steps, start, end = 8, 0.1, 0.4
    scales: list[float] = []
    hook = controlnet(controlled, "canny").register_forward_pre_hook(
        lambda _module, _args, kwargs: scales.append(kwargs["conditioning_scale"]), with_kwargs=True
    )
    source = source_image(tmp_path, (TEST_SIDE, TEST_SIDE))
    sources = {
        "txt2img": {},
        "img2img": dict(image=source, prompt_strength=strength),
        "inpaint": dict(image=source, mask=half_mask(tmp_path, (TEST_SIDE, TEST_SIDE)), prompt_strength=strength),
    }
    if strength < 1.0:
        del sources["txt2img"]  # which has no prompt_strength
    guided = {}
    try:
        for mode, inputs in sources.items():
            scales.clear()
            _, metrics = predict(
                controlled,
                controls=[control("canny", maps["edges"], start=start, end=end)],
                refine="expert_ensemble_refiner",
                high_noise_frac=0.5,
                num_inference_steps=steps,
                **inputs,
            )
            assert len(scales) == metrics["base_steps"], mode
            guided[mode] = [scale > 0 for scale in scales]
    finally:
        hook.remove()
    total = int(steps * strength)  # diffusers' steps after strength (its get_timesteps)
    expected = [i / total >= start and (i + 1) / total <= end for i in range(metrics["base_steps"])]
    assert any(expected) and not all(expected)  # a window that cuts the base's steps both ways
    assert guided == dict.fromkeys(sources, expected)


def test_a_window_restated_over_the_kept_steps_guides_the_same_steps():
    """Every window on a 0.05 grid, every schedule up to 12 steps and every cut: diffusers' rule over the kept steps
    with the restated window picks the kept steps the original window picks over them all, and diffusers accepts
    the restated window (0 <= start < end <= 1)."""
    grid = [round(k * 0.05, 2) for k in range(21)]
    for total in range(1, 13):
        for kept in range(1, total + 1):
            for start, end in ((s, e) for s in grid for e in grid if s < e):
                new_start, new_end = window_over_kept_steps(start, end, total, kept)
                assert 0.0 <= new_start < new_end <= 1.0
                guided = [i for i in range(total) if i < kept and i / total >= start and (i + 1) / total <= end]
                assert guided == [i for i in range(kept) if i / kept >= new_start and (i + 1) / kept <= new_end], (
                    start,
                    end,
                    total,
                    kept,
                )


def test_preprocessing_makes_the_map_the_preprocessor_makes(controlled, maps, tmp_path):
    """From the photo fitted to the output size, whatever its size: a photo of another size and shape (300x200) shows
    the map is made after fitting, not made and then fitted."""
    wide = source_image(tmp_path, (300, 200))
    for source in (maps["photo"], wide):
        original = Image.open(source).convert("RGB")
        photo = images.fit(original, (TEST_SIDE, TEST_SIDE))
        for type_, make in (
            ("canny", preprocess.canny),
            (
                "depth",
                lambda i: preprocess.depth(
                    controlled.weights.control.depth_estimator.model,
                    controlled.weights.control.depth_estimator.processor,
                    i,
                ),
            ),
        ):
            made = image(controlled, controls=[control(type_, source, preprocess_=True)])
            ready = tmp_path / f"{type_}-map.png"
            make(photo).save(ready)
            assert max_diff(made, image(controlled, controls=[control(type_, ready)])) == 0, (source, type_)
            if source == wide:  # the map of the unfitted photo, fitted as a ready map is, is another image
                make(original).save(ready)
                assert max_diff(made, image(controlled, controls=[control(type_, ready)])) > 0, type_


def test_a_control_image_is_fitted_like_image_and_sizes_a_text_to_image_request(controlled, tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((128, 384, 3), 200, np.uint8)).save(wide)
    request = make_request(width=None, height=None, controls=[control("canny", wide)])
    assert (request.width, request.height) == (384, 128)
    assert request.controls[0].image.size == (384, 128)
    request = make_request(width=TEST_SIDE, height=TEST_SIDE, controls=[control("canny", wide)])
    assert request.controls[0].image.size == (TEST_SIDE, TEST_SIDE)  # covered and centre-cropped, not stretched


@pytest.mark.parametrize("refine", ["expert_ensemble_refiner", "base_image_refiner"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_every_mode_with_the_refiner_controls_the_base_alone(controlled, maps, tmp_path, mode, refine):
    source = source_image(tmp_path, (TEST_SIDE, TEST_SIDE)) if mode != "txt2img" else None
    mask = half_mask(tmp_path, (TEST_SIDE, TEST_SIDE)) if mode == "inpaint" else None
    inputs = dict(image=source, mask=mask, refine=refine, high_noise_frac=0.5, num_inference_steps=4, seed=3)
    controlled_run, metrics = predict(controlled, controls=[control("canny", maps["edges"])], **inputs)
    plain_run, plain_metrics = predict(controlled, **inputs)
    assert (
        metrics["base_steps"] == plain_metrics["base_steps"]
        and metrics["refiner_steps"] == plain_metrics["refiner_steps"]
    )
    assert max_diff(controlled_run[0], plain_run[0]) > 0


def test_each_output_is_its_seed_alone_and_every_sampler_runs(controlled, maps):
    controls = [control("canny", maps["edges"])]
    two, _ = predict(controlled, controls=controls, num_outputs=2, seed=11, num_inference_steps=2)
    second, _ = predict(controlled, controls=controls, seed=12, num_inference_steps=2)
    assert max_diff(two[1], second[0]) <= 2  # a batch's arithmetic rounds differently, as without control
    for scheduler in ("DDIM", "DPM++ 2M Karras", "HeunDiscrete", "UniPC"):
        assert predict(controlled, controls=controls, scheduler=scheduler, num_inference_steps=2)[0][0].size == (
            TEST_SIDE,
            TEST_SIDE,
        )


def test_a_control_and_the_image_prompt_serve_every_checkpoint_and_a_lora(settings, tiny_weights, tmp_path, maps):
    root = Path(shutil.copytree(tiny_weights, tmp_path / "weights"))
    add_model(root, "other", seed=5)
    add_control(root, controlnets=("canny",), depth_estimator=False)
    service = SDXLService(dataclasses.replace(settings, weights_dir=root, lora_local_dirs=(root / "loras",)))
    (root / "loras").mkdir()
    save_file({f"unet.{k}": v for k, v in lora_state_dict(root).items()}, root / "loras" / "l.safetensors")
    kwargs = dict(controls=[control("canny", maps["edges"])], ip_adapter_image=maps["photo"])
    default, other = image(service, **kwargs), image(service, model="other", **kwargs)
    assert max_diff(default, other) > 2
    request = make_request(
        num_inference_steps=STEPS,
        seed=7,
        controls=kwargs["controls"],
        ip_adapter_image=maps["photo"],
        ip_adapter_scale=0.6,
    )
    with_lora = service.predict(request, RAW, str(root / "loras" / "l.safetensors"), 0.8)
    assert max_diff(Image.open(with_lora.paths[0]), default) > 2


# --- Metrics and embedded parameters ---------------------------------------------------------------------------


def test_metrics_time_the_preprocessing_and_the_image_prompt(controlled, maps):
    _, metrics = predict(
        controlled, controls=[control("depth", maps["photo"], preprocess_=True)], ip_adapter_image=maps["photo"]
    )
    assert metrics["control_preprocess_time"] > 0 and metrics["image_prompt_encoding_time"] > 0


# AUTOMATIC1111's parser of the pairs after the prompts (modules/infotext_utils.py, re_param_code), read from its
# source: a value is a JSON-quoted string or runs to the next comma.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_the_controls_and_the_image_prompt_are_recorded_as_controlnet_units(controlled, maps):
    images_, _ = predict(
        controlled,
        controls=[
            control("canny", maps["photo"], preprocess_=True, scale=0.5, end=0.8),
            control("pose", maps["edges"]),
        ],
        ip_adapter_image=maps["photo"],
        ip_adapter_scale=0.4,
        num_inference_steps=2,
    )
    pairs = dict(A1111_PARAM.findall(read_parameters(Path(images_[0].filename)).splitlines()[-1]))
    units = {
        k: dict(item.split(": ") for item in v.strip('"').split(", "))
        for k, v in pairs.items()
        if k.startswith("ControlNet")
    }
    # No single-type pose ControlNet is baked, so the union serves both controls; each unit names its mode.
    assert units["ControlNet 0"]["Module"] == "canny" and units["ControlNet 0"]["Weight"] == "0.5"
    assert units["ControlNet 0"]["Guidance End"] == "0.8" and units["ControlNet 0"]["Model"] == "union"
    assert units["ControlNet 0"]["Union Control Type"] == "canny"
    assert units["ControlNet 1"]["Module"] == "none" and units["ControlNet 1"]["Union Control Type"] == "pose"
    # The extension's module for the ViT-bigG adapter (the synthetic one is ip-adapter_sdxl): a bare "ip-adapter"
    # is refused by its ControlNetUnit.parse.
    assert units["ControlNet 2"]["Module"] == "ip-adapter_clip_g" and units["ControlNet 2"]["Weight"] == "0.4"


# --- Refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "controls, message",
    [
        ([control("none", "edges")], "controlnet_1_image was given but controlnet_1 is none"),
        ([control("canny", None)], "controlnet_1=canny needs controlnet_1_image"),
        ([control("sketch", "edges")], "controlnet_1='sketch' is not a control type"),
        ([control("canny", "edges", start=0.6, end=0.4)], "controlnet_1_start=0.6 must be below controlnet_1_end=0.4"),
        ([control("none"), control("pose", "edges", preprocess_=True)], "controlnet_2=pose has no preprocessor"),
    ],
)
def test_wrong_control_inputs_are_refused_naming_the_input(maps, controls, message):
    controls = [dataclasses.replace(c, image=maps[c.image] if c.image else None) for c in controls]
    with pytest.raises(InputError, match=re.escape(message)):
        make_request(controls=controls)


def test_what_the_image_lacks_is_refused_naming_the_flag_that_bakes_it(service, union_only, maps):
    with pytest.raises(InputError, match=r"no ControlNet for canny is baked.*--controlnet canny or --controlnet union"):
        predict(service, controls=[control("canny", maps["edges"])])
    with pytest.raises(InputError, match=r"ip_adapter_image needs an IP-Adapter.*--ip-adapter"):
        predict(service, ip_adapter_image=maps["photo"])
    with pytest.raises(InputError, match=r"needs a depth estimator.*--depth-estimator"):
        predict(union_only, controls=[control("depth", maps["photo"], preprocess_=True)])


def test_refiner_only_takes_no_control(maps, tmp_path):
    with pytest.raises(InputError, match="refine=refiner_only runs the refiner alone"):
        make_request(image=source_image(tmp_path), refine="refiner_only", controls=[control("canny", maps["edges"])])


def test_a_broken_control_image_is_refused(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="controlnet_1_image"):
        make_request(controls=[control("canny", broken)])


# --- No image is read before the refusals that need none -------------------------------------------------------------


@pytest.fixture
def broken(tmp_path) -> Path:
    """A file that fails to decode: a refusal that names something else proves it was never opened."""
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    return path


def test_a_control_the_server_lacks_is_refused_before_its_image_is_read(service, union_only, broken):
    with pytest.raises(InputError, match=r"no ControlNet for canny is baked"):
        make_request(controls=[control("canny", broken)], control_models=service.control_models)
    with pytest.raises(InputError, match=r"ip_adapter_image needs an IP-Adapter"):
        make_request(ip_adapter_image=broken, ip_adapter_scale=0.6, control_models=service.control_models)
    with pytest.raises(InputError, match=r"needs a depth estimator"):
        make_request(controls=[control("depth", broken, preprocess_=True)], control_models=union_only.control_models)


def test_refiner_only_refuses_a_control_before_its_image_is_read(broken, tmp_path):
    with pytest.raises(InputError, match="refine=refiner_only runs the refiner alone"):
        make_request(image=source_image(tmp_path), refine="refiner_only", controls=[control("canny", broken)])


def test_a_control_or_image_prompt_at_scale_zero_is_dropped_unread(service, maps, broken, tmp_path):
    """Scale 0 runs nothing: the image is never read, sizes nothing, and needs no model."""
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((128, 384, 3), 200, np.uint8)).save(wide)
    request = make_request(width=None, height=None, controls=[control("canny", wide, scale=0.0)])
    side = request.profile_defaults["width"]
    assert (request.width, request.height) == (side, side) and request.controls == ()
    request = make_request(
        controls=[control("canny", broken, scale=0.0), control("canny", maps["edges"])],
        ip_adapter_image=broken,
        ip_adapter_scale=0.0,
    )
    assert [c.slot for c in request.controls] == [2] and request.image_prompt is None
    # On a server with no control model at all, the same request without the scale-1 control is a plain one.
    request = make_request(
        controls=[control("canny", broken, scale=0.0)],
        ip_adapter_image=broken,
        ip_adapter_scale=0.0,
        control_models=service.control_models,
    )
    assert request.controls == () and request.image_prompt is None
    # The input checks still apply at scale 0.
    with pytest.raises(InputError, match="controlnet_1=canny needs controlnet_1_image"):
        make_request(controls=[control("canny", None, scale=0.0)])


def test_the_image_prompt_is_kept_at_most_1024_a_side(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.full((600, 3000, 3), 90, np.uint8)).save(big)
    assert make_request(ip_adapter_image=big).image_prompt.image.size == (1024, 205)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((300, 500, 3), 90, np.uint8)).save(small)
    assert make_request(ip_adapter_image=small).image_prompt.image.size == (500, 300)


def test_the_image_prompt_unit_names_the_extension_module_of_the_baked_adapter(controlled, maps):
    request = make_request(ip_adapter_image=maps["photo"], ip_adapter_scale=0.5)
    adapter = controlled.control_models.ip_adapter
    for variant, module in (("bigg", "ip-adapter_clip_g"), ("vit-h", "ip-adapter_clip_h")):
        entry = dataclasses.replace(adapter.entry, weight_name=IP_ADAPTERS[variant].weight_name)
        models = dataclasses.replace(controlled.control_models, ip_adapter=dataclasses.replace(adapter, entry=entry))
        (unit,) = control_units(request, models).values()
        model = IP_ADAPTERS[variant].weight_name.removesuffix(".safetensors")
        assert unit.startswith(f"Module: {module}, Model: {model}, Weight: 0.5"), unit
