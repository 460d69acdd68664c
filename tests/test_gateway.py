"""gateway/: real nginx (Debian's package, njs) in front of a real coglet running the CPU-only dummy
predictor. Keys, ids, limits, file inputs, webhooks, and waiting for the slot instead of 409."""

import base64
import io
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from devtools.cog_server import DUMMY_PREDICTOR_REF, REPO_ROOT, CogServer, free_port
from devtools.gateway import Gateway, GatewayError, nginx_available, nobody_readable_dir
from sdxl_cog.schema.openapi import build_schema

pytestmark = [
    pytest.mark.gateway,
    pytest.mark.skipif(not nginx_available(), reason="nginx (with libnginx-mod-http-js) and envsubst not installed"),
]

KEYS = ("first-key-0123456789", "second-key-9876543210")
BEARER = {"Authorization": f"Bearer {KEYS[0]}"}
# High enough that only the rate-limit test itself meets the limit.
UNLIMITED = {"SDXL_GATEWAY_RATE_PER_MINUTE": "60000", "SDXL_GATEWAY_BURST": "10000"}
DUMMY_INPUT = {"width": 16, "seed": 7}
SLOW_PREDICTOR_REF = f"{REPO_ROOT / 'tests/fixtures/slow_predictor.py'}:Predictor"
COGLET_TREE = Path("/tmp/coglet/predictions")
SEQUENTIAL_REQUESTS = 200


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    with CogServer(DUMMY_PREDICTOR_REF, cwd=tmp_path_factory.mktemp("cog")) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(cog):
    with Gateway(cog.port, env={"SDXL_API_KEYS": ",".join(KEYS), **UNLIMITED}) as running:
        yield running


def predict(gateway, body=None, headers=BEARER, **kwargs) -> requests.Response:
    body = {"input": DUMMY_INPUT} if body is None else body
    return requests.post(f"{gateway.url}/predictions", json=body, headers=headers, timeout=60, **kwargs)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def error_of(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.json()["error"]


# -- keys -------------------------------------------------------------------------------------------


def test_no_key_or_a_wrong_key_is_401_and_each_accepted_form_is_200(gateway, cog):
    missing = predict(gateway, headers={})
    assert missing.status_code == 401 and "Missing API key" in error_of(missing)
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    for wrong in ({"Authorization": "Bearer not-a-key"}, {"Authorization": "not-a-key"}, {"Authorization": "Bearer "}):
        response = predict(gateway, headers=wrong)
        assert response.status_code == 401, wrong
        assert error_of(response) in {"Invalid API key", 'Missing API key: send "Authorization: Bearer <key>"'}
    for accepted in (f"Bearer {KEYS[0]}", f"bearer {KEYS[1]}", KEYS[0], KEYS[1]):
        response = predict(gateway, headers={"Authorization": accepted})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "succeeded"

    gateway_log, cog_log = gateway.log(), cog.log_tail(10**7)
    assert "refused POST /predictions from 127.0.0.1: key missing" in gateway_log
    assert "key wrong" in gateway_log
    for key in (*KEYS, "not-a-key"):
        assert key not in gateway_log and key not in cog_log


def test_the_schema_needs_a_key_and_the_health_check_does_not(gateway):
    assert requests.get(f"{gateway.url}/openapi.json", timeout=10).status_code == 401
    schema = requests.get(f"{gateway.url}/openapi.json", headers=BEARER, timeout=10)
    assert schema.status_code == 200 and "Input" in schema.json()["components"]["schemas"]
    health = requests.get(f"{gateway.url}/health-check", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "READY"


def test_keys_from_a_file_one_per_line(cog, tmp_path):
    # nginx's workers drop root for `nobody`, who cannot enter pytest's private tmp_path.
    key_file = nobody_readable_dir("gateway-keys-") / "keys"
    key_file.write_text("# rotated 2026-12-01\nfile-key-one\n\n  file-key-two  \n")
    with Gateway(cog.port, env={"SDXL_API_KEYS_FILE": str(key_file), **UNLIMITED}) as gateway:
        assert predict(gateway, headers={"Authorization": "Bearer file-key-two"}).status_code == 200
        assert predict(gateway, headers={"Authorization": "Bearer # rotated 2026-12-01"}).status_code == 401
        # Read at request time: a rotated Secret takes effect without a restart.
        key_file.write_text("file-key-three\n")
        assert predict(gateway, headers={"Authorization": "Bearer file-key-one"}).status_code == 401
        assert predict(gateway, headers={"Authorization": "Bearer file-key-three"}).status_code == 200


def test_refuses_to_start_without_keys_unless_open_access_is_intended(cog):
    without_keys = {"SDXL_API_KEYS": "", "SDXL_API_KEYS_FILE": "", "SDXL_OPEN_ACCESS": ""}
    with pytest.raises(GatewayError, match="no API key configured"):
        Gateway(cog.port, env=without_keys).start()
    with Gateway(cog.port, env={**without_keys, "SDXL_OPEN_ACCESS": "1", **UNLIMITED}) as gateway:
        assert predict(gateway, headers={}).status_code == 200


# -- ids --------------------------------------------------------------------------------------------


def test_traversal_and_undirectoryable_ids_are_400_and_nothing_is_created_outside_coglets_tree(gateway, cog):
    marker = f"gw-escape-{uuid.uuid4().hex[:8]}"
    escapes = [Path("/tmp") / marker, COGLET_TREE.parent / marker, Path("/tmp") / f"{marker}-b"]
    path_ids = [
        f"..%2F..%2F{marker}",
        f"%2e%2e%2f%2e%2e%2f{marker}",
        f"..%2F{marker}",
        "a%00b",
        "x" * 65,
        "a%20b",
        "a.b",
    ]
    body_ids = [f"../../{marker}", f"../../{marker}-b", "../x", "/abs", "a\u0000b", "x" * 256, "", 42]
    for path_id in path_ids:
        response = requests.put(
            f"{gateway.url}/predictions/{path_id}", json={"input": DUMMY_INPUT}, headers=BEARER, timeout=30
        )
        assert response.status_code == 400, (path_id, response.text)
        assert "Invalid prediction id" in error_of(response) or "could not be parsed" in error_of(response)
    for body_id in body_ids:
        response = predict(gateway, {"id": body_id, "input": DUMMY_INPUT})
        assert response.status_code == 400, (body_id, response.text)
        assert "Invalid prediction id in the body" in error_of(response)
    mismatch = requests.put(
        f"{gateway.url}/predictions/good-id", json={"id": "other-id", "input": DUMMY_INPUT}, headers=BEARER, timeout=30
    )
    assert mismatch.status_code == 400 and "differs" in error_of(mismatch)
    cancel = requests.post(f"{gateway.url}/predictions/..%2F{marker}/cancel", headers=BEARER, timeout=30)
    assert cancel.status_code == 400

    assert not [path for path in escapes if path.exists()]
    assert marker not in cog.log_tail(10**7), "a refused id reached coglet"
    assert cog.health()["status"] == "READY"
    # A well-formed id still works, in the path and in the body.
    ok = requests.put(f"{gateway.url}/predictions/gw_ok-1", json={"input": DUMMY_INPUT}, headers=BEARER, timeout=30)
    assert ok.status_code == 200 and ok.json()["id"] == "gw_ok-1"
    assert predict(gateway, {"id": "gw_ok-2", "input": DUMMY_INPUT}).json()["id"] == "gw_ok-2"


def test_coglets_other_routes_stay_behind_the_gateway(gateway, cog):
    response = requests.post(f"{gateway.url}/shutdown", headers=BEARER, timeout=10)
    assert response.status_code == 404 and "Not found" in error_of(response)
    assert cog.health()["status"] == "READY"


# -- limits -----------------------------------------------------------------------------------------


def test_an_over_size_body_is_413(gateway):
    body = b'{"input": {"prompt": "' + b"x" * (49 * 2**20) + b'"}}'
    response = requests.post(
        f"{gateway.url}/predictions", data=body, headers={**BEARER, "Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 413
    assert "a prediction may send 48mB" in error_of(response)


def test_over_the_rate_is_429_with_retry_after(cog):
    with Gateway(cog.port, env={"SDXL_API_KEYS": KEYS[0], "SDXL_GATEWAY_RATE_PER_MINUTE": "6"}) as gateway:
        statuses = []
        for _ in range(30):
            response = requests.get(f"{gateway.url}/openapi.json", headers=BEARER, timeout=10)
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        assert response.headers["Retry-After"] == "10"  # 6 a minute: one every 10 s
        assert "6 requests a minute" in error_of(response)
        # Per key: another key (here none: counted by address) has its own allowance.
        assert requests.get(f"{gateway.url}/openapi.json", timeout=10).status_code == 401


# -- file inputs and webhooks -----------------------------------------------------------------------


def test_a_url_for_a_file_input_is_400_unless_allowed_and_a_data_uri_goes_through(gateway):
    for value in ("http://127.0.0.1:9/cat.png", "https://example.com/cat.png"):
        response = predict(gateway, {"input": {**DUMMY_INPUT, "image": value}})
        assert response.status_code == 400
        assert 'Input "image" is a URL' in error_of(response) and "data: URI" in error_of(response)
    # A server path: coglet would hand it to the predictor as a file to read.
    response = predict(gateway, {"input": {**DUMMY_INPUT, "image": "/etc/hostname"}})
    assert response.status_code == 400 and 'Input "image" must be a data: URI' in error_of(response)

    image = data_uri(Image.new("RGB", (8, 8), (10, 20, 30)))
    response = predict(gateway, {"input": {**DUMMY_INPUT, "image": image}})
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    sent_bytes = len(base64.b64decode(image.split(",", 1)[1]))
    assert response.json()["metrics"]["image_bytes"] == sent_bytes


def test_without_a_schema_the_gateway_still_refuses_urls_for_every_file_input_of_predict_py(tmp_path):
    """coglet serves no /openapi.json without .cog/openapi_schema.json: the gateway falls back to predict.py's file
    inputs, which must be all of them."""
    properties = build_schema()["components"]["schemas"]["Input"]["properties"]
    names = [name for name, schema in properties.items() if schema.get("format") == "uri"]
    with CogServer(DUMMY_PREDICTOR_REF, cwd=tmp_path, generate_schema=False) as cog:
        assert requests.get(f"{cog.url}/openapi.json", timeout=10).status_code != 200
        with Gateway(cog.port, env={"SDXL_API_KEYS": KEYS[0], **UNLIMITED}) as gateway:
            for name in names:
                response = predict(gateway, {"input": {**DUMMY_INPUT, name: "https://example.com/cat.png"}})
                assert response.status_code == 400, (name, response.text)
                assert f'Input "{name}" is a URL' in error_of(response)
            assert predict(gateway).status_code == 200


def test_allowed_url_inputs_must_name_a_public_host(cog):
    env = {"SDXL_API_KEYS": KEYS[0], "SDXL_GATEWAY_ALLOW_URL_INPUTS": "1", **UNLIMITED}
    refused = {
        "http://127.0.0.1/a.png": "IP address literals",
        "http://2130706433/a.png": "IP address literals",
        "http://0x7f.1/a.png": "IP address literals",
        "http://[::1]/a.png": "IP address literals",
        "http://localhost/a.png": "single-label",
        "http://metadata.google.internal/a.png": "internal",
        "http://sdxl.default.svc.cluster.local/a.png": "internal",
        "http://user@example.com/a.png": "user names",
        "http://example.com:8080/a.png": "default ports",
        "ftp://example.com/a.png": "must be a data: URI",
    }
    with Gateway(cog.port, env=env) as gateway:
        for url, reason in refused.items():
            response = predict(gateway, {"input": {**DUMMY_INPUT, "image": url}})
            assert response.status_code == 400, url
            assert reason in error_of(response), (url, error_of(response))


def test_webhooks_are_refused_unless_allowed_then_public_hosts_only(gateway, cog):
    response = predict(gateway, {"input": DUMMY_INPUT, "webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 400 and "Webhooks are not enabled" in error_of(response)
    env = {"SDXL_API_KEYS": KEYS[0], "SDXL_GATEWAY_ALLOW_WEBHOOKS": "1", **UNLIMITED}
    with Gateway(cog.port, env=env) as allowing:
        response = predict(allowing, {"input": DUMMY_INPUT, "webhook": "http://10.0.0.8/hook"})
        assert response.status_code == 400 and "Webhook URL refused" in error_of(response)


# -- waiting for the slot instead of 409 --------------------------------------------------------------


def count_sequential(url: str, headers: dict, count: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        for _ in range(count):
            response = session.post(f"{url}/predictions", json={"input": DUMMY_INPUT}, headers=headers, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    return statuses


def test_strictly_sequential_requests_never_get_409_through_the_gateway(gateway, cog):
    direct = count_sequential(cog.url, {}, SEQUENTIAL_REQUESTS)
    through = count_sequential(gateway.url, BEARER, SEQUENTIAL_REQUESTS)
    print(
        f"\n{SEQUENTIAL_REQUESTS} sequential sync requests: straight to coglet {direct}, through the gateway {through}"
    )
    print(f"409s straight to coglet: {direct.get(409, 0)}; 409s through the gateway: {through.get(409, 0)}")
    assert through == {200: SEQUENTIAL_REQUESTS}


@pytest.fixture(scope="module")
def slow_cog(tmp_path_factory):
    with CogServer(SLOW_PREDICTOR_REF, cwd=tmp_path_factory.mktemp("slow-cog")) as server:
        yield server


def test_concurrent_clients_wait_within_the_bound_or_get_a_clear_refusal(slow_cog):
    clients, per_client, queue, wait_s, sleep_s = 8, 10, 4, 2.0, 0.3
    env = {"SDXL_API_KEYS": KEYS[0], "SDXL_GATEWAY_QUEUE": str(queue), "SDXL_GATEWAY_QUEUE_WAIT_S": str(wait_s)}
    results: list[tuple[int, float, str, str | None]] = []
    lock = threading.Lock()

    def client(gateway):
        with requests.Session() as session:
            for _ in range(per_client):
                started = time.monotonic()
                response = session.post(
                    f"{gateway.url}/predictions", json={"input": {"sleep_s": sleep_s}}, headers=BEARER, timeout=60
                )
                with lock:
                    results.append(
                        (
                            response.status_code,
                            time.monotonic() - started,
                            response.text,
                            response.headers.get("Retry-After"),
                        )
                    )

    with Gateway(slow_cog.port, env={**env, **UNLIMITED}) as gateway:
        threads = [threading.Thread(target=client, args=(gateway,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert slow_cog.health()["status"] == "READY"
        assert requests.get(f"{gateway.url}/health-check", timeout=10).json()["status"] == "READY"

    by_status: dict[int, int] = {}
    for status, _, _, _ in results:
        by_status[status] = by_status.get(status, 0) + 1
    longest = max(elapsed for _, elapsed, _, _ in results)
    print(
        f"\n{clients} clients x {per_client} requests (queue {queue}, wait bound {wait_s} s): {by_status}, "
        f"longest answer {longest:.2f} s"
    )
    assert len(results) == clients * per_client
    assert by_status.get(200, 0) > 0 and 409 not in by_status
    for status, elapsed, text, retry_after in results:
        assert status in (200, 503), text
        if status == 503:
            assert retry_after == "5", text
            assert "Server busy" in text
        # The bound: a wait of at most wait_s, then the one prediction that got the slot.
        assert elapsed < wait_s + sleep_s + 1.5, (status, elapsed)


def test_waiting_requests_ask_coglet_less_and_less_often(slow_cog):
    """Each ask is a subrequest held in the waiting request's memory and a GPU check in the predictor. Three
    requests waiting 3.7 s asked 103 times at a fixed 50 ms (worker RSS +8.6 MB), 20 times backing off to
    500 ms (+4.2 MB); over 11.7 s, 311 times (+19.8 MB) against 41 (+5.4 MB)."""
    hold_s, waiters = 4.0, 3
    checks_file = slow_cog.cwd / "health-checks.log"

    def checks() -> int:
        return checks_file.read_text().count("\n") if checks_file.exists() else 0

    queue = {"SDXL_GATEWAY_QUEUE": str(1 + waiters), "SDXL_GATEWAY_QUEUE_PER_KEY": str(1 + waiters)}
    with Gateway(slow_cog.port, env={"SDXL_API_KEYS": KEYS[0], **queue, **UNLIMITED}) as gateway:
        with ThreadPoolExecutor(1 + waiters) as pool:
            holder = pool.submit(predict, gateway, {"input": {"sleep_s": hold_s}})
            time.sleep(0.3)
            before, memory_before = checks(), gateway.worker_memory_kb()
            started = time.monotonic()
            waiting = [pool.submit(predict, gateway, {"input": {"sleep_s": 0.05}}) for _ in range(waiters)]
            assert holder.result().status_code == 200
            held_s = time.monotonic() - started
            asked, memory_held = checks() - before, gateway.worker_memory_kb()
            assert [waiter.result().status_code for waiter in waiting] == [200] * waiters
            waited_s = time.monotonic() - started
    print(
        f"\n{waiters} requests waiting {held_s:.1f} s for the slot: {asked} health checks; worker RSS "
        f"{memory_before['VmRSS']} kB -> {memory_held['VmRSS']} kB"
    )
    assert asked <= waiters * 12, asked
    # Backing off costs at most one longest pause per waiter (each runs 0.05 s once the slot is free).
    assert waited_s < held_s + waiters * (0.5 + 0.05) + 1.0, (held_s, waited_s)


def test_an_async_prediction_can_be_followed_step_by_step_through_the_gateway(slow_cog):
    """coglet has no GET /predictions/{id}: the gateway takes its webhook events and answers it."""
    with Gateway(slow_cog.port, env={"SDXL_API_KEYS": ",".join(KEYS), **UNLIMITED}) as gateway:
        started = requests.post(
            f"{gateway.url}/predictions",
            json={"input": {"sleep_s": 2.0, "steps": 4}},
            headers={**BEARER, "Prefer": "respond-async"},
            timeout=30,
        )
        assert started.status_code == 202, started.text
        url = f"{gateway.url}/predictions/{started.json()['id']}"
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = requests.get(url, headers=BEARER, timeout=10).json()
            seen.append((state["status"], (state.get("logs") or "").strip().splitlines()[-1:]))
            if state["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.1)
        print(f"\nstates polled: {sorted({(status, tuple(lines)) for status, lines in seen})}")
        assert state["status"] == "succeeded", state
        # The output is a file the gateway keeps, read with the same key.
        output = requests.get(f"{gateway.url}{state['output']}", headers=BEARER, timeout=10)
        assert output.status_code == 200 and output.content.startswith(b"\x89PNG")
        steps_while_running = {tuple(lines) for status, lines in seen if status == "processing" and lines}
        assert len(steps_while_running) >= 2, seen  # progress arrived while it ran, not only at the end
        assert ("base: step 4/4",) in {tuple(lines) for _, lines in seen}

        # Only the key that started it reads it back; others learn nothing, not even that it exists.
        other = requests.get(url, headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=10)
        assert other.status_code == 404 and "No prediction" in error_of(other)
        assert requests.get(url, timeout=10).status_code == 401
        bad = requests.get(f"{gateway.url}/predictions/..%2Fx", headers=BEARER, timeout=10)
        assert bad.status_code == 400
        # Repeating someone's id does not make their prediction yours.
        other_key = {"Authorization": f"Bearer {KEYS[1]}", "Prefer": "respond-async"}
        body = {"input": {"sleep_s": 0.1}}
        requests.put(url, json=body, headers=other_key, timeout=30)
        assert requests.get(url, headers=other_key, timeout=10).status_code == 404
        assert requests.get(url, headers=BEARER, timeout=10).status_code == 200


# -- script/serve --gateway ----------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, from /proc/net/tcp (IPv4, state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def private_checkout() -> Path:
    """What script/serve --gateway needs of the checkout, copied into a directory only root may enter (as a
    checkout in /root is): nginx's workers, which run as nobody, cannot read anything in it."""
    home = Path(tempfile.mkdtemp(prefix="private-home-"))
    home.chmod(0o700)
    checkout = home / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "node_modules")
    for name in ("script", "gateway", "sdxl_cog"):
        shutil.copytree(REPO_ROOT / name, checkout / name, ignore=ignore)
    swagger = checkout / "gateway/node_modules/swagger-ui-dist"
    swagger.mkdir(parents=True)
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        shutil.copy(REPO_ROOT / "gateway/node_modules/swagger-ui-dist" / name, swagger)
    (checkout / ".venv").symlink_to(REPO_ROOT / ".venv")
    return checkout


def test_script_serve_gateway_listens_on_host_with_coglet_on_loopback_and_pages_from_a_private_checkout():
    checkout = private_checkout()
    port, coglet_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "COGLET_PORT": str(coglet_port),
        "PREDICTOR": DUMMY_PREDICTOR_REF,
        "SDXL_API_KEYS": KEYS[0],
        "SDXL_GATEWAY_RUN_DIR": str(nobody_readable_dir("serve-run-") / "run"),
    }
    log_path = checkout.parent / "serve.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(checkout / "script/serve"), "--gateway"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and status != "READY":
            assert process.poll() is None, log_path.read_text()
            try:
                status = requests.get(f"http://127.0.0.1:{port}/health-check", timeout=2).json().get("status")
            except requests.RequestException:
                time.sleep(0.3)
        assert status == "READY", log_path.read_text()
        assert listening_addresses(coglet_port) == {"127.0.0.1"}
        assert listening_addresses(port) == {"127.0.0.1"}, "HOST applies to the gateway"
        for page in ("/", "/docs/", "/static/playground.js", "/docs/swagger-ui/swagger-ui-bundle.js"):
            assert requests.get(f"http://127.0.0.1:{port}{page}", timeout=10).status_code == 200, page
        assert (
            requests.post(f"http://127.0.0.1:{port}/predictions", json={"input": DUMMY_INPUT}, timeout=30).status_code
            == 401
        )
        response = requests.post(
            f"http://127.0.0.1:{port}/predictions", json={"input": DUMMY_INPUT}, headers=BEARER, timeout=30
        )
        assert response.status_code == 200 and response.json()["status"] == "succeeded"
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
        log.close()
        shutil.rmtree(checkout.parent, ignore_errors=True)
    assert process.returncode is not None
    assert not listening_addresses(coglet_port) and not listening_addresses(port)
