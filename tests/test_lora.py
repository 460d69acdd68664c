"""LoRA per request: made for the tiny UNet, served over loopback HTTP, in PEFT and kohya key formats."""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.synthetic import LORA_RANK, lora_state_dict
from sdxl_cog.device.health import DeviceHealth, DeviceUnhealthy
from sdxl_cog.errors import InputError
from tests.conftest import DEFAULT_OPTIONS, make_request, pixels


def _to_kohya(peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kohya = {}
    for key, tensor in peft.items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    return kohya


@pytest.fixture(scope="module")
def lora_files(tiny_weights, settings) -> dict[str, Path]:
    peft = lora_state_dict(tiny_weights)
    directory = settings.lora_local_dirs[0]
    directory.mkdir(parents=True, exist_ok=True)
    files = {"peft": directory / "peft.safetensors", "kohya": directory / "kohya.safetensors"}
    save_file({f"unet.{k}": v for k, v in peft.items()}, files["peft"])
    save_file(_to_kohya(peft), files["kohya"])
    files["not_safetensors"] = directory / "broken.safetensors"
    files["not_safetensors"].write_bytes(b"this is not a safetensors file" * 10)
    files["wrong_keys"] = directory / "wrong.safetensors"
    save_file({"some.unrelated.weight": torch.ones(3, 3)}, files["wrong_keys"])
    return files


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []
    hosts: list[str] = []  # the Host header of each request
    # /trickle/NAME sends NAME a byte at a time; /lie/NAME declares a Content-Length other than the
    # body's while `lie` is set (True: shorter, so the client stops early; "long": longer, then hangs up).
    lie: bool | str = False
    TRICKLE_INTERVAL_S = 0.05

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        type(self).hosts.append(self.headers["Host"])
        kind, _, name = self.path.split("?")[0].lstrip("/").partition("/")
        if kind == "trickle":
            body = self.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(self.TRICKLE_INTERVAL_S)
            except BrokenPipeError:
                pass  # the client gave up, as it should
            return
        if kind == "lie" and self.lie:
            body = self.files[name]
            declared = len(body) // 2 if self.lie is True else len(body) * 2
            self.send_response(200)
            self.send_header("Content-Length", str(declared))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        if kind == "lie":
            self.path = "/" + name
        if self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        body = self.files.get(self.path.split("?")[0].lstrip("/"))
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def file_server(lora_files):
    _Files.files = {name: path.read_bytes() for name, path in lora_files.items()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def loopback_allowed(service):
    original = service.checkpoints.default.loras.settings
    service.checkpoints.default.loras.settings = dataclasses.replace(original, lora_allow_private_hosts=True)
    yield service.checkpoints.default.loras.settings
    service.checkpoints.default.loras.settings = original


def generate(service, lora=None, scale=0.6, **overrides) -> np.ndarray:
    prediction = service.predict(make_request(seed=31, **overrides), DEFAULT_OPTIONS, lora, scale)
    return pixels(Image.open(prediction.paths[0]))


@pytest.fixture(scope="module")
def base(service) -> np.ndarray:
    """generate() without a LoRA: what every request without one must give, before and after any LoRA."""
    return generate(service)


def test_lora_from_url_changes_output_scale_matters_and_leaves_nothing_behind(
    service, file_server, loopback_allowed, base
):
    full = generate(service, f"{file_server}/peft", 1.0)
    light = generate(service, f"{file_server}/peft", 0.2)
    after = generate(service)
    assert np.abs(full - base).max() > 0
    assert np.abs(light - full).max() > 0
    assert np.array_equal(after, base)  # exactly the base model again


def test_downloads_are_cached(service, file_server, loopback_allowed):
    _Files.hits.clear()
    generate(service, f"{file_server}/peft?cached", 1.0)
    generate(service, f"{file_server}/peft?cached", 1.0)
    assert _Files.hits == ["/peft?cached"]


def test_kohya_keys_load_from_an_allowed_local_path(service, lora_files, base):
    with_kohya = generate(service, str(lora_files["kohya"]), 1.0)
    with_peft = generate(service, str(lora_files["peft"]), 1.0)
    assert np.abs(with_kohya - base).max() > 0
    assert np.abs(with_kohya - with_peft).max() <= 2  # the same weights, in another key format


@pytest.mark.parametrize(
    "name,message",
    [("not_safetensors", "not a valid .safetensors file"), ("wrong_keys", "could not be loaded as an SDXL LoRA")],
)
def test_bad_lora_file_is_refused_and_leaves_the_model_unchanged(service, lora_files, base, name, message):
    with pytest.raises(InputError, match=message):
        generate(service, str(lora_files[name]), 1.0)
    assert np.array_equal(generate(service), base)


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("Triton Error [CUDA]: unspecified launch failure"),
    ],
    ids=["torch", "triton"],
)
def test_a_sticky_cuda_error_while_loading_is_not_blamed_on_the_file(service, lora_files, monkeypatch, error):
    """The GPU's error reaches the service unchanged, and the health check reports it; it is no InputError
    about lora_weights."""
    monkeypatch.setattr(service.checkpoints.default.loras.pipeline, "load_lora_weights", _raising(error))
    monkeypatch.setattr(service, "health", DeviceHealth(device_check=None))  # the session's service stays healthy
    with pytest.raises(RuntimeError) as raised:
        generate(service, str(lora_files["peft"]), 1.0)
    assert raised.value is error
    with pytest.raises(DeviceUnhealthy, match=re.escape(str(error))):
        service.health.check()


def test_out_of_memory_while_loading_is_reported_as_such(service, lora_files, monkeypatch, base):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    monkeypatch.setattr(service.checkpoints.default.loras.pipeline, "load_lora_weights", _raising(error))
    with pytest.raises(InputError, match="^Out of GPU memory") as raised:
        generate(service, str(lora_files["peft"]), 1.0)
    assert "lora_weights" not in str(raised.value)
    monkeypatch.undo()
    assert np.array_equal(generate(service), base)


def _raising(error: BaseException):
    def load_lora_weights(*args, **kwargs):
        raise error

    return load_lora_weights


def test_loopback_urls_are_refused_by_default(service, file_server):
    with pytest.raises(InputError, match="non-public address 127.0.0.1"):
        generate(service, f"{file_server}/peft")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/lora.safetensors", "gopher://x/y"])
def test_other_schemes_are_refused(service, url):
    with pytest.raises(InputError, match="use an http\\(s\\) URL"):
        generate(service, url)


def test_local_paths_outside_allowed_directories_are_refused(service, tiny_weights):
    with pytest.raises(InputError, match="outside the allowed directories"):
        generate(service, str(tiny_weights / "base" / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(InputError, match="outside the allowed directories"):
        generate(
            service, str(service.checkpoints.default.loras.settings.lora_local_dirs[0] / ".." / "escape.safetensors")
        )


def test_redirect_loops_and_oversized_files_are_refused(service, file_server, loopback_allowed):
    with pytest.raises(InputError, match="redirected more than"):
        generate(service, f"{file_server}/loop")
    service.checkpoints.default.loras.settings = dataclasses.replace(loopback_allowed, lora_max_bytes=1000)
    with pytest.raises(InputError, match="larger than"):
        generate(service, f"{file_server}/kohya")


def cached_files(settings) -> list[Path]:
    return sorted(settings.lora_cache_dir.glob("*"))


def test_the_timeout_is_a_deadline_for_the_whole_download(service, file_server, loopback_allowed):
    # Each byte comes well within any per-read timeout; the whole file would take minutes.
    service.checkpoints.default.loras.settings = dataclasses.replace(loopback_allowed, lora_timeout_s=1.0)
    before = cached_files(loopback_allowed)
    started = time.monotonic()
    with pytest.raises(
        InputError, match=r"took longer than the 1 s allowed \(SDXL_LORA_TIMEOUT_S\); nothing was cached"
    ):
        generate(service, f"{file_server}/trickle/peft", 1.0)
    print(f"\n[trickle] refused after {time.monotonic() - started:.2f} s with SDXL_LORA_TIMEOUT_S=1")
    assert cached_files(loopback_allowed) == before


@pytest.mark.parametrize("lie", [True, "long"], ids=["content-length-shorter-than-body", "longer-than-body"])
def test_a_download_that_is_not_whole_is_never_cached(service, file_server, loopback_allowed, base, lie):
    url = f"{file_server}/lie/peft?{lie}"
    before = cached_files(loopback_allowed)
    _Files.lie = lie
    try:
        with pytest.raises(InputError, match="nothing was cached|not a valid .safetensors file"):
            generate(service, url, 1.0)
    finally:
        _Files.lie = False
    assert cached_files(loopback_allowed) == before
    assert np.array_equal(generate(service), base)
    # The URL is not poisoned: once it serves the whole file, the LoRA loads and applies.
    assert np.abs(generate(service, url, 1.0) - base).max() > 0


# -- DNS rebinding: the download connects to the address that was checked ------------------------------

PUBLIC_ADDRESS = "93.184.215.14"  # a global address: passes the host policy; nothing is ever sent to it


def fake_resolver(monkeypatch, host: str, answers):
    """Make `host` resolve to the next of `answers` at each lookup (the last one repeats); other names as usual."""
    real = socket.getaddrinfo
    seen: list[str] = []

    def getaddrinfo(name, port, *args, **kwargs):
        if name != host:
            return real(name, port, *args, **kwargs)
        address = answers[min(len(seen), len(answers) - 1)]
        seen.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture
def loopback_only(monkeypatch):
    """Connections to anything but loopback are refused here and recorded: nothing leaves the machine."""
    real, attempts = socket.socket.connect, []

    def connect(sock, address):
        attempts.append(address[0])
        if not address[0].startswith("127."):
            raise ConnectionRefusedError(f"test: no connection to {address[0]} (loopback only)")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize("public_answers", [1, 2], ids=["public-once", "public-twice"])
def test_a_rebinding_name_is_never_fetched_from_the_address_it_turns_into(
    service, file_server, loopback_only, monkeypatch, public_answers
):
    """The name answers a public address first (however many lookups the check makes), then loopback, where
    the file server is. The download must connect to the public address it checked, never to loopback."""
    port = int(file_server.rsplit(":", 1)[1])
    lookups = fake_resolver(monkeypatch, "lora.rebind.test", [PUBLIC_ADDRESS] * public_answers + ["127.0.0.1"])
    _Files.hits.clear()
    with pytest.raises(InputError, match="could not be downloaded"):
        generate(service, f"http://lora.rebind.test:{port}/peft?rebind", 1.0)
    print(f"\n[rebinding] lookups answered {lookups}; connections attempted to {loopback_only}")
    assert _Files.hits == [], "the download reached the address the name turned into after the check"
    assert loopback_only == [PUBLIC_ADDRESS]


def test_the_pinned_download_keeps_the_name_in_the_host_header(service, file_server, loopback_allowed, monkeypatch):
    port = int(file_server.rsplit(":", 1)[1])
    # After the one lookup the name moves to an address where nothing listens (all of 127/8 is loopback).
    fake_resolver(monkeypatch, "lora.pinned.test", ["127.0.0.1", "127.0.0.2"])
    _Files.hits.clear()
    _Files.hosts.clear()
    generate(service, f"http://lora.pinned.test:{port}/peft?pinned", 1.0)
    assert _Files.hits == ["/peft?pinned"] and _Files.hosts == [f"lora.pinned.test:{port}"]


@pytest.fixture(scope="module")
def tls_file_server(lora_files, tmp_path_factory):
    """The file server over TLS with a certificate for lora.tls.test only, from a CA made here."""
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
        "-keyout", str(directory / "ca.key"), "-out", str(ca),
    )  # fmt: skip
    openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=lora.tls.test",
        "-keyout", str(key), "-out", str(directory / "cert.csr"),
    )  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=DNS:lora.tls.test\n")
    openssl(
        "x509", "-req", "-in", str(directory / "cert.csr"), "-CA", str(ca), "-CAkey", str(directory / "ca.key"),
        "-CAcreateserial", "-days", "1", "-extfile", str(directory / "san.ext"), "-out", str(cert),
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], ca
    server.shutdown()


def test_the_pinned_https_download_checks_the_certificate_against_the_name(
    service, tls_file_server, file_server, loopback_allowed, monkeypatch
):
    port, ca = tls_file_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    fake_resolver(monkeypatch, "lora.tls.test", ["127.0.0.1"])
    _Files.hits.clear()
    generate(service, f"https://lora.tls.test:{port}/peft?tls", 1.0)
    assert _Files.hits == ["/peft?tls"]
    # A name the certificate does not carry is refused, though it resolves to the same server.
    fake_resolver(monkeypatch, "lora.other.test", ["127.0.0.1"])
    with pytest.raises(InputError, match="could not be downloaded"):
        generate(service, f"https://lora.other.test:{port}/peft?other", 1.0)
