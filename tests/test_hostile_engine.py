"""Hostile input in the engine, without the server: which file inputs are Cog's own downloads, prompt
length, what a long prompt costs in the memory budget, and the sweeps that must never delete what
they did not make."""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from cog.types import Path as CogPath
from PIL import Image

from devtools.local_request import predict_defaults
from sdxl_cog.config import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
from sdxl_cog.device.memory import GIB, MemoryBudget, out_of_memory_error
from sdxl_cog.errors import InputError
from sdxl_cog.generation.prompts import check_prompt_lengths
from sdxl_cog.inputs.request import build_request
from sdxl_cog.inputs.uploads import claim_input_dir, client_file, refusal, sweep_stale_inputs
from sdxl_cog.outputs.coglet_leftovers import sweep_empty_runtime_dirs
from sdxl_cog.outputs.directory import OutputDirectory
from tests.conftest import DEFAULT_OPTIONS, REQUEST_DEFAULTS, make_request


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def input_dir(tmp_path):
    """A claimed input directory, as setup() makes one; the process's previous tempdir afterwards."""
    previous = tempfile.tempdir
    claim_input_dir(tmp_path / "inputs")
    yield tmp_path / "inputs"
    tempfile.tempdir = previous


def downloaded() -> CogPath:
    """A file input exactly as coglet materialises one: cog's own Path.validate + URLPath.convert."""
    return CogPath.validate(png_data_uri()).convert()


# --- file inputs ---------------------------------------------------------------------------------------


def test_cogs_own_downloads_are_accepted_and_decoded(input_dir):
    path = downloaded()
    assert path.parent == input_dir
    request = build_request(**{**predict_defaults(), **REQUEST_DEFAULTS, "image": path, "width": None, "height": None})
    assert (request.mode, request.width) == ("img2img", 128)


def test_only_cogs_own_files_pass_whatever_they_look_like(input_dir, tmp_path):
    genuine = downloaded()
    outside = tmp_path / "tmpabcdefghfile.png"
    outside.write_bytes(genuine.read_bytes())
    os.chmod(outside, 0o600)
    link = input_dir / "tmpzzzzzzzzfile.png"
    link.symlink_to(outside)
    hard = input_dir / "tmpyyyyyyyyfile.png"
    os.link(outside, hard)
    readable = Path(tempfile.NamedTemporaryFile(suffix="file.png", delete=False).name)
    os.chmod(readable, 0o644)
    (input_dir / "sub").mkdir()
    nested = input_dir / "sub" / "tmpxxxxxxxxfile.png"
    nested.write_bytes(b"")
    not_named = input_dir / "photo.png"
    not_named.write_bytes(b"")
    os.chmod(not_named, 0o600)
    refused = {
        "plain string (how coglet passes any non-URL)": str(genuine),
        "outside the input directory": CogPath(outside),
        "link named like a download": CogPath(link),
        "hard link": CogPath(hard),
        "readable by others": CogPath(readable),
        "in a subdirectory": CogPath(nested),
        "not tempfile's name": CogPath(not_named),
        "missing": CogPath(input_dir / "tmpqqqqqqqqfile.png"),
        "dot-dot back in": CogPath(input_dir / "sub" / ".." / ".." / "tmpabcdefghfile.png"),
    }
    for name, value in refused.items():
        with pytest.raises(InputError) as error:
            client_file(value, "image")
        assert str(error.value) == str(refusal("image")), name
    assert client_file(genuine, "mask") == genuine
    assert client_file(None, "mask") is None


def test_stale_leftovers_of_failed_downloads_are_swept_and_nothing_else(input_dir):
    stale, fresh = downloaded(), downloaded()
    other = input_dir / "operator-notes.txt"
    other.write_text("keep")
    target = input_dir / "target.png"
    target.write_text("keep")
    link = input_dir / "tmplinklinkfile.png"
    link.symlink_to(target)
    old = time.time() - 7200
    for path in (stale, other, target):
        os.utime(path, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    assert sweep_stale_inputs() == [Path(stale)]
    assert fresh.exists() and other.exists() and target.exists() and link.is_symlink()


# --- prompt length -----------------------------------------------------------------------------------


def tokenizers(service):
    return [service.checkpoints.default.model.components[name] for name in ("tokenizer", "tokenizer_2")]


def test_prompt_length_is_counted_in_tokens_and_bounded(service):
    # The test weights' tokenizer makes one token of every character.
    assert check_prompt_lengths(tokenizers(service), "a" * MAX_PROMPT_TOKENS, "b" * 10) == MAX_PROMPT_TOKENS
    with pytest.raises(InputError, match=rf"^negative_prompt is {MAX_PROMPT_TOKENS + 1} tokens long; at most 750 "):
        check_prompt_lengths(tokenizers(service), "a", "b" * (MAX_PROMPT_TOKENS + 1))
    # Characters are checked first, so the tokenizer never sees an unbounded string.
    with pytest.raises(InputError, match=rf"^prompt is {MAX_PROMPT_CHARS + 1} characters long; at most 7500"):
        check_prompt_lengths(tokenizers(service), "a " * (MAX_PROMPT_CHARS // 2) + "a", "")


def test_a_prompt_over_the_budget_is_refused_before_any_work(service, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the UNet ran for a refused request")

    monkeypatch.setattr(service.checkpoints.default.model.components["unet"], "forward", must_not_run)
    with pytest.raises(InputError, match="prompt is 751 tokens long"):
        service.predict(make_request(prompt="p" * 751), DEFAULT_OPTIONS, None, 0.6)


def test_a_long_prompt_counts_in_the_memory_budget_and_in_the_out_of_memory_message():
    budget = MemoryBudget(capacity_bytes=24 * GIB, resident_bytes=11 * GIB)
    request = make_request(width=1024, height=1024, num_outputs=4)
    short, long = budget.estimate(request, 75), budget.estimate(request, MAX_PROMPT_TOKENS)
    # Nine chunks past the first: text encoders for both prompts, cross-attention per image.
    assert long - short == 9 * (2 * int(6.5 * 1024**2) + 4 * 16 * 1024**2)
    tight = MemoryBudget(capacity_bytes=short + 1, resident_bytes=11 * GIB)
    tight.check(request, 75)
    with pytest.raises(
        InputError, match=r"from a 750-token prompt \(10 chunks of 75\) need about .* shorten the prompt"
    ):
        tight.check(request, MAX_PROMPT_TOKENS)
    message = str(out_of_memory_error(request, 300))
    assert "4 image(s) at 1024x1024 from a 300-token prompt (4 chunks of 75)" in message
    assert "shorten the prompt" in message and "shorten" not in str(out_of_memory_error(request, 75))


def test_out_of_memory_on_a_long_prompt_names_the_prompt(service, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(service.checkpoints.default.model.components["unet"], "forward", exhausted)
    with pytest.raises(InputError, match=r"from a 200-token prompt \(3 chunks of 75\): .* shorten the prompt"):
        service.predict(make_request(prompt="q" * 200), DEFAULT_OPTIONS, None, 0.6)


# --- sweeps and the output directory -----------------------------------------------------------------


def make_old(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (0, 0), follow_symlinks=False)


def test_the_runtime_sweep_never_follows_links_nor_leaves_its_root(tmp_path):
    root, elsewhere = tmp_path / "predictions", tmp_path / "operator"
    (elsewhere / "empty-a").mkdir(parents=True)
    (elsewhere / "nested" / "empty-b").mkdir(parents=True)
    (root / "pred_1" / "inputs").mkdir(parents=True)
    (root / "pred_2").mkdir()
    (root / "linked").symlink_to(elsewhere)  # a prediction dir that is a link
    (root / "pred_2" / "outputs").symlink_to(elsewhere / "nested")  # a part that is a link
    make_old(root / "pred_1" / "inputs", root / "pred_1", root / "pred_2", root / "linked")
    sweep_empty_runtime_dirs(root, min_age_s=60)
    assert not (root / "pred_1").exists()
    assert (elsewhere / "empty-a").is_dir() and (elsewhere / "nested" / "empty-b").is_dir()
    # A root that is itself a link is not swept at all.
    link_root = tmp_path / "link-root"
    link_root.symlink_to(elsewhere)
    sweep_empty_runtime_dirs(link_root, min_age_s=0)
    assert (elsewhere / "empty-a").is_dir()


def test_output_directory_removes_only_its_own_oldest(tmp_path):
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "operator.png").write_bytes(b"mine")
    (root / "0123456789ab").mkdir()  # named like ours, made by someone else
    outputs = OutputDirectory(root, keep=2)
    made = [outputs.start_prediction()[0] for _ in range(3)]
    assert [d.exists() for d in made] == [False, True, True]
    assert (root / "operator.png").read_bytes() == b"mine" and (root / "0123456789ab").is_dir()
    # One of ours replaced by a link: the link is not followed when its turn comes.
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    made[1].rename(tmp_path / "moved")
    made[1].symlink_to(target)
    outputs.start_prediction()
    assert (target / "keep.txt").exists()
