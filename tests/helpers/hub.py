"""A stand-in for the Hugging Face Hub, offline: mirrors of the repos download-weights reads, with small stand-in files
in the real repos' layouts (main branch), and a loopback server for the parts of the Hub API huggingface_hub uses.

The mirror copies what the layout must skip too: the base's own VAE, full-precision and ONNX/OpenVINO/Flax weights,
single-file checkpoints, the refiner's text_encoder_2.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import safetensors.torch
import torch

from sdxl_cog.weights.layout import MANIFEST_NAME

BASE, REFINER = "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0"
VAE, SAFETY = "madebyollin/sdxl-vae-fp16-fix", "CompVis/stable-diffusion-safety-checker"
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
ENCODER_FILES = (
    "config.json",
    "model.fp16.safetensors",
    "model.safetensors",
    "flax_model.msgpack",
    "model.onnx",
    "openvino_model.bin",
    "openvino_model.xml",
)
UNET_FILES = (
    "config.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
    "diffusion_flax_model.msgpack",
    "model.onnx",
    "model.onnx_data",
    "openvino_model.bin",
)
VAE_FILES = ("config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors")

# What each repo holds (stand-ins for the real files; the safety checker's pickle is built separately).
REPO_FILES = {
    BASE: [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "README.md",
        "LICENSE.md",
        "01.png",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0_0.9vae.safetensors",
        "sd_xl_offset_example-lora_1.0.safetensors",
        "vae_decoder/model.onnx",
        "vae_encoder/model.onnx",
        *[f"{d}/{f}" for d in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES],
        *[f"{d}/{f}" for d in ("text_encoder", "text_encoder_2") for f in ENCODER_FILES],
        *[f"unet/{f}" for f in UNET_FILES],
        *[f"{d}/{f}" for d in ("vae", "vae_1_0") for f in VAE_FILES],
    ],
    REFINER: [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "README.md",
        "sd_xl_refiner_1.0.safetensors",
        *[f"tokenizer_2/{f}" for f in TOKENIZER_FILES],
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        "text_encoder_2/model.safetensors",
        *[f"unet/{f}" for f in UNET_FILES[:3]],
        *[f"{d}/{f}" for d in ("vae", "vae_1_0") for f in VAE_FILES],
    ],
    VAE: [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "sdxl.vae.safetensors",
        "sdxl_vae.safetensors",
        "images/fix-fp16.png",
    ],
    SAFETY: ["README.md", "config.json", "preprocessor_config.json"],  # + pytorch_model.bin: no safetensors on main
}
SAFETY_TENSORS = {"concept_embeds": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor([7])}
VAE_TENSORS = {"decoder.conv_in.weight": torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)}


def make_mirror(root: Path) -> Path:
    for repo, files in REPO_FILES.items():
        for name in files:
            path = root / repo / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{repo}/{name}\n".encode() * 3)
    torch.save(SAFETY_TENSORS, root / SAFETY / "pytorch_model.bin")
    safetensors.torch.save_file(VAE_TENSORS, root / VAE / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    return root


def layout_files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts and p.name != MANIFEST_NAME
    }


def mtimes(root: Path) -> dict[str, int]:
    return {name: (root / name).stat().st_mtime_ns for name in layout_files(root)}


class FakeHub(http.server.ThreadingHTTPServer):
    """The parts of the Hub API huggingface_hub uses here, serving the mirror's repos at fixed commits."""

    def __init__(self, mirror: Path):
        self.mirror, self.requests = mirror, []
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def commit_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()  # 40 hex digits, as the Hub's


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    ROUTES = (  # (regex over the path, handler method)
        (r"/api/models/([\w.-]+/[\w.-]+)/revision/([^/]+)", "model_info"),
        (r"/api/models/([\w.-]+/[\w.-]+)/tree/([^/]+)", "tree"),
        (r"/([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)", "resolve"),
    )

    def do_GET(self):
        path = self.path.split("?")[0]
        for pattern, method in self.ROUTES:
            if match := re.fullmatch(pattern, path):
                self.server.requests.append((self.command, path, self.headers.get("Authorization")))
                return getattr(self, method)(*match.groups())
        self.send_error(404)  # e.g. huggingface_hub's /api/agent-harnesses, irrelevant here

    do_HEAD = do_GET

    def files(self, repo: str) -> list[Path]:
        root = self.server.mirror / repo
        return sorted(p for p in root.rglob("*") if p.is_file())

    def send_json(self, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def model_info(self, repo: str, revision: str):
        root = self.server.mirror / repo
        siblings = [{"rfilename": p.relative_to(root).as_posix()} for p in self.files(repo)]
        self.send_json({"id": repo, "sha": commit_of(repo), "siblings": siblings})

    def tree(self, repo: str, revision: str):
        root = self.server.mirror / repo
        self.send_json(
            [
                {
                    "type": "file",
                    "path": p.relative_to(root).as_posix(),
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                }
                for p in self.files(repo)
            ]
        )

    def resolve(self, repo: str, revision: str, name: str):
        body = (self.server.mirror / repo / name).read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit_of(repo))
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def log_message(self, *args):
        pass
