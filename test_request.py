"""Make a prediction on a running Cog server and save its outputs, like `cog predict` does.

    python test_request.py -i prompt="an astronaut riding a horse" -i seed=42
    python test_request.py -i prompt="a watercolor" -i image=@photo.png --output-dir outputs --logs
    python test_request.py --health

`-i key=value` values are converted to the input's type from the server's /openapi.json;
`@path` sends the file as a data: URI. Exits non-zero, with the server's message, when the
prediction fails, the input is rejected (422), the server stays busy (409) or cannot be reached.

A 409 means "busy, try again": Cog runs one prediction at a time and, even for a client that waits
for each answer, frees its slot a moment after the response, so the next request can land in that
moment. The request is sent again with exponential backoff and jitter for up to --busy-wait seconds
(--no-retry: never); the retries and the time they took are printed.

Behind the project's gateway (script/serve --gateway), pass its key with --api-key or SDXL_API_KEY; it is sent
as `Authorization: Bearer KEY` to the server's own URL only, never to an output's download URL.
"""

import argparse
import base64
import json
import mimetypes
import os
import random
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

DEFAULT_URL = "http://localhost:5000"
# SDXL at 1024px with the refiner takes minutes on a slow GPU, far longer on CPU.
DEFAULT_TIMEOUT_S = 1800
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# How long a 409 is retried by default: long enough to ride out coglet's slot release after a response
# (milliseconds) and a short prediction of another client, short enough to report a server that is
# busy for good (a long generation, a dead worker) within half a minute.
DEFAULT_BUSY_WAIT_S = 30
# Backoff between retries: the first waits 25-50 ms (coglet's slot is usually back within a few ms), each
# later one twice as long up to a 2-4 s cap, so a 30 s wait is about a dozen requests, not hundreds.
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 4.0
# Health states from which Cog never recovers without a restart: retrying a 409 then only wastes time.
DEAD_STATES = {"SETUP_FAILED", "DEFUNCT", "UNHEALTHY"}


class RequestError(Exception):
    """Anything that ends the run with a message and a non-zero exit."""


class ServerKey(requests.auth.AuthBase):
    """`Authorization: Bearer KEY` on requests to the server itself, and on nothing else."""

    def __init__(self, server_url: str, key: str):
        self.origin = urllib.parse.urlsplit(server_url)[:2]
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if urllib.parse.urlsplit(request.url)[:2] == self.origin:
            request.headers["Authorization"] = f"Bearer {self.key}"
        return request


SESSION = requests.Session()


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an input; repeat for several (and for each item of a list input)",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the Cog server (default {DEFAULT_URL})")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait")
    parser.add_argument(
        "--busy-wait",
        type=seconds,
        default=DEFAULT_BUSY_WAIT_S,
        metavar="SECONDS",
        help=f"retry a busy server (HTTP 409) for up to this long (default {DEFAULT_BUSY_WAIT_S})",
    )
    parser.add_argument(
        "--no-retry", dest="busy_wait", action="store_const", const=0, help="report a 409 at once, never retry it"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SDXL_API_KEY"),
        help="the gateway's API key (default: $SDXL_API_KEY), sent as Authorization: Bearer",
    )
    parser.add_argument("--logs", action="store_true", help="print the prediction's logs")
    parser.add_argument("--health", action="store_true", help="print /health-check and exit")
    return parser.parse_args(argv)


def input_types(url: str) -> dict[str, dict] | None:
    """`{name: schema}` of the server's inputs, with enum refs resolved; None without a schema."""
    try:
        response = SESSION.get(f"{url}/openapi.json", timeout=10)
        response.raise_for_status()
        return schema_input_types(response.json())
    except (requests.RequestException, ValueError, KeyError):
        return None


def schema_input_types(document: dict) -> dict[str, dict]:
    """`{name: schema}` of the inputs of a Cog server's OpenAPI document, with enum refs resolved."""
    schemas = document["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    for name, prop in properties.items():
        for ref in prop.get("allOf", []):
            properties[name] = {**schemas[ref["$ref"].rsplit("/", 1)[-1]], **prop}
    return properties


def data_uri(path: Path) -> str:
    if not path.is_file():
        raise RequestError(f"input file not found: {path}")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def coerce(name: str, text: str, schema: dict | None) -> Any:
    """Turn `text` into the JSON value the input expects."""
    if text.startswith("@"):
        return data_uri(Path(text[1:]))
    kind = (schema or {}).get("type")
    if kind == "array":
        kind = schema.get("items", {}).get("type")
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
        if kind == "boolean":
            return BOOLEANS[text.lower()]
    except (ValueError, KeyError):
        raise RequestError(f"input {name}={text!r} is not a valid {kind}") from None
    if kind == "string":
        return text
    try:  # no schema for this input: take JSON literals (42, 1.5, true, null), else the text
        return json.loads(text)
    except ValueError:
        return text


def build_input(pairs: list[str], types: dict[str, dict] | None) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise RequestError(f"expected -i KEY=VALUE, got {pair!r}")
        schema = (types or {}).get(name)
        value = coerce(name, text, schema)
        if schema and schema.get("type") == "array":
            inputs.setdefault(name, []).append(value)
        else:
            inputs[name] = value
    return inputs


def request(method: str, url: str, **kwargs: Any) -> requests.Response:
    try:
        return SESSION.request(method, url, **kwargs)
    except requests.ConnectionError:
        raise RequestError(f"cannot connect to a Cog server at {url} (is script/serve running?)") from None
    except requests.Timeout:
        raise RequestError(f"no answer from {url} within {kwargs.get('timeout')}s (--timeout)") from None


def check_response(response: requests.Response) -> dict:
    """The prediction JSON, or a RequestError that says why there is none."""
    if response.status_code == 422:
        details = response.json().get("detail", [])
        lines = [f"  {'.'.join(map(str, d['loc'][2:])) or 'input'}: {d['msg']}" for d in details]
        raise RequestError("invalid input (HTTP 422):\n" + "\n".join(lines))
    if response.status_code == 409:
        raise RequestError(f"server busy (HTTP 409): {response.text.strip()}")
    if response.status_code == 401:
        raise RequestError(
            f"the server wants an API key (HTTP 401): {response.text.strip()}; pass --api-key KEY or set SDXL_API_KEY"
        )
    if not response.ok:
        raise RequestError(f"HTTP {response.status_code}: {response.text.strip()}")
    return response.json()


@dataclass
class BusyRetries:
    """What riding out 409s cost one request: how many times it was sent again, and the seconds that took."""

    retries: int = 0
    waited_s: float = 0.0

    def __str__(self) -> str:
        return f"server busy (HTTP 409): sent again {self.retries} time(s), waited {self.waited_s:.2f} s in all"


def backoff_s(retry: int) -> float:
    """Exponential backoff with equal jitter: half the step is fixed, so no retry goes out at once."""
    step = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**retry)
    return step / 2 + random.uniform(0, step / 2)


def health_status(url: str) -> str | None:
    try:
        return request("GET", f"{url}/health-check", timeout=10).json().get("status")
    except (RequestError, ValueError):
        return None


def post_prediction(url: str, body: dict, timeout: float, busy_wait_s: float) -> tuple[requests.Response, BusyRetries]:
    """POST /predictions, sending it again while the server answers 409, for up to `busy_wait_s` seconds.

    Returns the first answer that is not a 409, or the last 409 once the wait is spent (or at once when
    `busy_wait_s` is 0), with the retries it took.
    """
    busy = BusyRetries()
    started = time.monotonic()
    while True:
        response = request("POST", f"{url}/predictions", json=body, timeout=timeout)
        if response.status_code != 409:
            return response, busy
        left = busy_wait_s - (time.monotonic() - started)
        if left <= 0 or health_status(url) in DEAD_STATES:
            busy.waited_s = time.monotonic() - started
            return response, busy
        time.sleep(min(backoff_s(busy.retries), left))
        busy.retries += 1
        busy.waited_s = time.monotonic() - started


def output_files(output: Any) -> list[str]:
    """The data: URIs and URLs in an output (a value, a list, or an object of them)."""
    if isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, list):
        values = output
    else:
        values = [output]
    return [v for v in values if isinstance(v, str) and v.startswith(("data:", "http://", "https://"))]


def fetch(uri: str, index: int, timeout: float) -> tuple[str, bytes]:
    """`(file name, content)` of a data: URI or a URL."""
    if uri.startswith("data:"):
        header, _, payload = uri.partition(",")
        mime = header[5:].split(";")[0] or "application/octet-stream"
        ext = mimetypes.guess_extension(mime) or ".bin"
        body = base64.b64decode(payload) if header.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
        return f"output-{index}{ext}", body
    response = request("GET", uri, timeout=timeout)
    if not response.ok:
        raise RequestError(f"could not download output {uri}: HTTP {response.status_code}")
    name = Path(urllib.parse.urlparse(uri).path).name or f"output-{index}"
    return name, response.content


def save_outputs(output: Any, output_dir: Path, timeout: float) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    for index, uri in enumerate(output_files(output)):
        name, body = fetch(uri, index, timeout)
        path = output_dir / name
        if path in saved:  # two outputs with one name: keep both
            path = output_dir / f"{index}-{name}"
        path.write_bytes(body)
        saved.append(path)
    return saved


def predict(args: argparse.Namespace) -> None:
    types = input_types(args.url)
    if types is None:
        print("warning: no /openapi.json; sending -i values as JSON literals", file=sys.stderr)
    body = {"input": build_input(args.input, types)}
    response, busy = post_prediction(args.url, body, args.timeout, args.busy_wait)
    if response.status_code == 409:
        raise RequestError(busy_message(args.url, response, busy, args.busy_wait))
    if busy.retries:
        print(busy, file=sys.stderr)
    prediction = check_response(response)
    if args.logs and prediction.get("logs"):
        print(prediction["logs"].rstrip())
    if prediction.get("status") != "succeeded":
        raise RequestError(f"prediction {prediction.get('status')}: {prediction.get('error')}")
    for path in save_outputs(prediction.get("output"), args.output_dir, args.timeout):
        print(f"saved {path}")
    if not output_files(prediction.get("output")):
        print(json.dumps(prediction.get("output"), indent=2))
    print("metrics: " + json.dumps(prediction.get("metrics", {}), indent=2))


def busy_message(url: str, response: requests.Response, busy: BusyRetries, busy_wait_s: float) -> str:
    answer = response.text.strip()
    status = health_status(url)
    if status in DEAD_STATES:
        return f"server busy (HTTP 409): {answer}; its health is {status}, which Cog never leaves: restart it"
    if busy_wait_s <= 0:
        return f"server busy (HTTP 409): {answer} (not retried: --no-retry)"
    return (
        f"server still busy (HTTP 409) after {busy.retries} retries over {busy.waited_s:.1f} s: {answer}; "
        f"try again later or wait longer (--busy-wait SECONDS)"
    )


def health(url: str) -> None:
    status = request("GET", f"{url}/health-check", timeout=10).json()
    print(json.dumps(status, indent=2))
    if status.get("status") not in ("READY", "BUSY"):
        raise RequestError(f"server is {status.get('status')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.url = args.url.rstrip("/")
    if args.api_key:
        SESSION.auth = ServerKey(args.url, args.api_key)
    try:
        if args.health:
            health(args.url)
        else:
            predict(args)
    except RequestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
