"""The gateway as hostile clients meet it (issue 20): real nginx (njs) in front of a real coglet, on loopback.

Clients without a key cost nothing: refused on their headers, before any body is read or any queue place
used, and limited per address. A key is limited to its share of the queue. Every prediction belongs to the
key that started it, on disk, across reloads and worker restarts. Only coglet can write async states.
Every socket and loop below is bounded in count and time."""

import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from devtools.cog_server import REPO_ROOT, CogServer
from devtools.gateway import Gateway, nginx_available

pytestmark = [
    pytest.mark.gateway,
    pytest.mark.skipif(not nginx_available(), reason="nginx (with libnginx-mod-http-js) and envsubst not installed"),
]

KEY_A, KEY_B = "tenant-a-0123456789", "tenant-b-9876543210"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
ASYNC = {"Prefer": "respond-async"}
SLOW_PREDICTOR_REF = f"{REPO_ROOT / 'tests/fixtures/slow_predictor.py'}:Predictor"
# High enough that only the tests of the rate meet it.
UNLIMITED = {"SDXL_GATEWAY_RATE_PER_MINUTE": "60000", "SDXL_GATEWAY_BURST": "10000"}
QUICK = {"input": {"sleep_s": 0.05}}
# How long a held connection waits for the gateway's first answer line.
ANSWER_TIMEOUT_S = 5
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    with CogServer(SLOW_PREDICTOR_REF, cwd=tmp_path_factory.mktemp("cog")) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(cog):
    with Gateway(cog.port, env={"SDXL_API_KEYS": f"{KEY_A},{KEY_B}", **UNLIMITED}) as running:
        yield running


def error_of(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.json()["error"]


class HeldRequest:
    """A request whose headers are sent at once and whose body then trickles a byte a second (never
    completing within the test), as a slow or hostile client sends it."""

    def __init__(self, port: int, head: str, declared: int = 1_000_000):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S)
        self.sock.sendall(f"{head}\r\nHost: gateway\r\nContent-Length: {declared}\r\n\r\n{{".encode())
        self.stop = threading.Event()
        threading.Thread(target=self._trickle, daemon=True).start()

    def _trickle(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.sock.sendall(b" ")
            except OSError:
                return

    def status(self, timeout: float = ANSWER_TIMEOUT_S) -> int | None:
        """The status the gateway answered, or None if it is still reading the body after `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            line = self.sock.recv(64)
        except TimeoutError:
            return None
        return int(line.split()[1]) if line.startswith(b"HTTP/") else None

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def post(gateway, headers, body=QUICK, path="/predictions", timeout=30) -> requests.Response:
    return requests.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=timeout)


def wait_until_finished(gateway, prediction_id: str, headers, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = requests.get(f"{gateway.url}/predictions/{prediction_id}", headers=headers, timeout=10).json()
        if state.get("status") in TERMINAL:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{prediction_id} not finished after {timeout_s} s: {state}")


# -- 1. nothing costs the server anything before the key is known ---------------------------------------


def flood(url: str, count: int, seen: dict[int, int]) -> None:
    """`count` keyless requests back to back: predictions with a wrong key, unknown paths."""
    with requests.Session() as session:
        for index in range(count):
            if index % 2:
                response = session.post(f"{url}/predictions", json=QUICK, headers={"Authorization": "Bearer guess"})
            else:
                response = session.get(f"{url}/no-such-path-{index}")
            seen[response.status_code] = seen.get(response.status_code, 0) + 1


def test_keyless_clients_trickling_or_flooding_are_refused_on_their_headers_and_keyed_ones_are_served(cog):
    queue = 4
    env = {"SDXL_API_KEYS": KEY_A, "SDXL_GATEWAY_QUEUE": str(queue), **UNLIMITED}
    with Gateway(cog.port, env=env) as gateway:
        # More than the whole queue, to a prediction path and to a path that does not exist.
        held = [HeldRequest(gateway.port, "POST /predictions HTTP/1.1") for _ in range(2 * queue)]
        held += [HeldRequest(gateway.port, "PUT /predictions/some-id HTTP/1.1") for _ in range(2)]
        held += [HeldRequest(gateway.port, "POST /no-such-path HTTP/1.1") for _ in range(2)]
        flooded: dict[int, int] = {}
        flooder = threading.Thread(target=flood, args=(gateway.url, 400, flooded))
        try:
            statuses = [request.status() for request in held]
            flooder.start()
            # Keyed predictions go through while every keyless connection still trickles and a flood runs.
            keyed = [post(gateway, A).status_code for _ in range(6)]
            flooder.join(60)
        finally:
            for request in held:
                request.close()
    print(f"\nkeyless trickling requests answered {statuses}; a keyless flood {flooded}; keyed meanwhile: {keyed}")
    assert statuses == [401] * (2 * queue + 2) + [404] * 2, "refused on the headers, before the body"
    assert flooded == {401: 200, 404: 200}
    assert keyed == [200] * 6


def test_keyless_requests_are_limited_per_address_in_rate_and_in_number(cog):
    per_address = 4
    env = {"SDXL_API_KEYS": KEY_A, "SDXL_GATEWAY_PER_ADDRESS": str(per_address), "SDXL_GATEWAY_RATE_PER_MINUTE": "60"}
    with Gateway(cog.port, env={**env, "SDXL_GATEWAY_BURST": "1000"}) as gateway:
        # A refused request whose body is still coming stays in progress (nginx reads and drops the
        # body), so the address can hold only so many.
        held = [HeldRequest(gateway.port, "POST /predictions HTTP/1.1") for _ in range(per_address + 2)]
        try:
            statuses = [request.status() for request in held]
            keyed = post(gateway, A).status_code
        finally:
            for request in held:
                request.close()
        assert statuses == [401] * per_address + [503] * 2, statuses
        assert keyed == 200
    with Gateway(cog.port, env={**env, "SDXL_GATEWAY_BURST": "5"}) as gateway:
        # Unknown paths count against the address's rate; the open health check has a rate of its own
        # (10 a second, burst 20), so that probes do not use up what the pages may load.
        seen = [requests.get(f"{gateway.url}/no-such-path", timeout=10).status_code for _ in range(8)]
        assert seen[0] == 404 and seen[-2:] == [429, 429], seen
        with requests.Session() as session:
            health = [session.get(f"{gateway.url}/health-check", timeout=10).status_code for _ in range(40)]
        assert health[0] == 200 and health[-1] == 429, health


def test_no_body_is_buffered_without_a_key(gateway):
    """Five 40 MB bodies sent without a key to a prediction path and to an unknown path: answered on
    the headers and never held. (Before: the worker grew from 7 MB to 207 MB.)"""
    before = gateway.worker_memory_kb()["VmRSS"]
    chunk = b"x" * 2**20
    for path in ("/predictions", "/no-such-path"):
        socks = []
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=ANSWER_TIMEOUT_S)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {40 * 2**20}\r\n\r\n".encode())
            socks.append(sock)
        sent = [0] * len(socks)
        for index, sock in enumerate(socks):
            try:
                for _ in range(40):
                    sock.sendall(chunk)
                    sent[index] += 1
            except OSError:
                pass  # the gateway closed it: the body was not wanted
        answers = [sock.recv(64).split(b"\r\n")[0] for sock in socks]
        memory = gateway.worker_memory_kb()
        for sock in socks:
            sock.close()
        print(f"\n{path}: {answers[0].decode()}, MB sent per connection {sent}, worker {memory} kB (before {before})")
        assert all(b" 401 " in answer or b" 404 " in answer for answer in answers), answers
        assert memory["VmHWM"] - before < 16 * 1024, "a keyless body was buffered"


def test_one_keys_slow_bodies_take_only_its_share_of_the_queue(cog):
    queue, per_key = 4, 2
    env = {
        "SDXL_API_KEYS": f"{KEY_A},{KEY_B}",
        "SDXL_GATEWAY_QUEUE": str(queue),
        "SDXL_GATEWAY_QUEUE_PER_KEY": str(per_key),
        **UNLIMITED,
    }
    with Gateway(cog.port, env=env) as gateway:
        head = f"POST /predictions HTTP/1.1\r\nAuthorization: Bearer {KEY_A}\r\nContent-Type: application/json"
        held = [HeldRequest(gateway.port, head) for _ in range(per_key + 2)]
        try:
            # Still reading the first ones' bodies a second later: nothing to answer yet.
            statuses = [request.status(timeout=1.0) for request in held]
            others = [post(gateway, B).status_code for _ in range(4)]
        finally:
            for request in held:
                request.close()
    print(f"\nkey A's slow bodies: {statuses} (None: still being read); key B meanwhile: {others}")
    assert statuses == [None] * per_key + [503] * 2
    assert others == [200] * 4


# -- 2. every prediction belongs to the key that started it ----------------------------------------------


def test_ids_the_gateway_makes_are_128_random_bits(gateway):
    ids = [post(gateway, A).json()["id"] for _ in range(3)]
    ids.append(post(gateway, {**A, **ASYNC}).json()["id"])
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids), ids
    # 32 lowercase hex digits each, nothing else (int() alone would take "0x", "_" and whitespace).
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids


def every_route(gateway, prediction_id: str, headers) -> dict[str, requests.Response]:
    """Each route that names an id; the PUT last, since it claims an id nobody holds."""
    url = f"{gateway.url}/predictions/{prediction_id}"
    return {
        "GET": requests.get(url, headers=headers, timeout=10),
        "cancel": requests.post(f"{url}/cancel", headers=headers, timeout=10),
        "output": requests.get(f"{url}/outputs/0.png", headers=headers, timeout=10),
        "PUT": requests.put(url, json=QUICK, headers={**headers, **ASYNC}, timeout=30),
    }


def test_another_key_gets_404_on_every_route_exactly_as_for_an_id_that_does_not_exist(gateway):
    running = post(gateway, {**A, **ASYNC}, {"input": {"sleep_s": 3, "steps": 3}}).json()
    time.sleep(0.5)
    by_b = every_route(gateway, running["id"], B)
    by_b_unknown = every_route(gateway, "no-such-prediction-0000", B)
    for route, response in by_b.items():
        assert response.status_code == 404, (route, response.text)
        # The same answer as for an id nobody used (the PUT's names the id it was given).
        unknown = by_b_unknown[route]
        if route != "PUT":
            assert response.text == unknown.text.replace("no-such-prediction-0000", running["id"])
        assert "sleep_s" not in response.text
    # The PUT that would have claimed the unknown id for B did, and A cannot now take it.
    assert by_b_unknown["PUT"].status_code == 202
    taken = requests.put(f"{gateway.url}/predictions/no-such-prediction-0000", json=QUICK, headers=A, timeout=30)
    assert taken.status_code == 404 and "cannot be used with this key" in error_of(taken)
    # B's cancel did nothing: A's prediction runs to its end, and only A reads it.
    state = wait_until_finished(gateway, running["id"], A)
    assert state["status"] == "succeeded", state
    assert requests.get(f"{gateway.url}{state['output']}", headers=A, timeout=10).status_code == 200
    # Without a key: 401 on every route, the same for any id.
    for route, response in every_route(gateway, running["id"], {}).items():
        assert response.status_code == 401, route


def test_the_owner_may_cancel_and_repeat_its_own_id_while_another_key_may_not(gateway):
    body = {"id": "owned-sync-1", "input": {"sleep_s": 3, "steps": 3}}
    with ThreadPoolExecutor(1) as pool:
        sync = pool.submit(post, gateway, A, body)
        time.sleep(1.0)
        assert post(gateway, B, {**body}).status_code == 404
        assert requests.post(f"{gateway.url}/predictions/owned-sync-1/cancel", headers=B, timeout=10).status_code == 404
        assert requests.post(f"{gateway.url}/predictions/owned-sync-1/cancel", headers=A, timeout=10).status_code == 200
        assert sync.result().json()["status"] == "canceled"


def test_the_owner_may_cancel_a_prediction_still_waiting_for_the_slot(gateway):
    """coglet does not know a prediction waiting in the gateway (its cancel is 404 there): the gateway cancels
    it, and it never runs. Another key's cancel still does nothing."""
    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(post, gateway, B, {"input": {"sleep_s": 3}})
        time.sleep(0.5)
        url = f"{gateway.url}/predictions"
        sync = pool.submit(requests.put, f"{url}/queued-sync-1", json=QUICK, headers=A, timeout=30)
        tracked = pool.submit(requests.put, f"{url}/queued-async-1", json=QUICK, headers={**A, **ASYNC}, timeout=30)
        time.sleep(0.5)
        assert requests.post(f"{url}/queued-sync-1/cancel", headers=B, timeout=10).status_code == 404
        for name in ("queued-sync-1", "queued-async-1"):
            canceled = requests.post(f"{url}/{name}/cancel", headers=A, timeout=10)
            assert (canceled.status_code, canceled.json()) == (200, {}), canceled.text
        canceled_at = time.monotonic()
        for name, waiting in (("queued-sync-1", sync), ("queued-async-1", tracked)):
            answer = waiting.result()
            assert answer.status_code == 200 and answer.json() == {"id": name, "logs": "", "status": "canceled"}
        # Within a poll of the cancel, not once the slot is free.
        assert time.monotonic() - canceled_at < 1.5
        assert not holder.done()
        assert holder.result().json()["status"] == "succeeded"
    assert wait_until_finished(gateway, "queued-async-1", A)["status"] == "canceled"
    # The owner may use the id again, and it runs.
    again = requests.put(f"{url}/queued-sync-1", json=QUICK, headers=A, timeout=30)
    assert again.status_code == 200 and again.json()["status"] == "succeeded", again.text


def test_two_keys_claiming_one_id_at_once_never_both_get_it(gateway):
    url = f"{gateway.url}/predictions/contested-id-1"

    def claim(headers):
        return requests.put(url, json=QUICK, headers={**headers, **ASYNC}, timeout=60).status_code

    # Two each: within each key's share of the queue.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(claim, [A, B] * 2))
    by_a, by_b = results[0::2], results[1::2]
    print(f"\nsame id at once: key A {by_a}, key B {by_b}")
    assert sorted([by_a, by_b]) == [[202, 202], [404, 404]], results


def test_ownership_holds_across_a_reload_and_a_worker_restart(gateway):
    started = post(gateway, {**A, **ASYNC}, {"id": "kept-across-restarts", "input": {"sleep_s": 0.1}})
    assert started.status_code == 202
    wait_until_finished(gateway, "kept-across-restarts", A)
    gateway.reload()
    (worker,) = gateway.worker_pids()
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and gateway.worker_pids() in ([], [worker]):
        time.sleep(0.1)
    for route, response in every_route(gateway, "kept-across-restarts", B).items():
        assert response.status_code == 404, (route, response.text)
    assert requests.get(f"{gateway.url}/predictions/kept-across-restarts", headers=A, timeout=10).status_code == 200


def test_an_id_is_free_again_once_its_retention_has_passed(gateway):
    assert post(gateway, A, {"id": "expiring-id", **QUICK}).status_code == 200
    assert post(gateway, B, {"id": "expiring-id", **QUICK}).status_code == 404
    # An hour and a minute later, as far as the store can tell.
    record = gateway.run_dir / "predictions/ids/expiring-id"
    past = time.time() - 3660
    os.utime(record, (past, past))
    assert post(gateway, B, {"id": "expiring-id", **QUICK}).status_code == 200
    assert requests.post(f"{gateway.url}/predictions/expiring-id/cancel", headers=A, timeout=10).status_code == 404
    # An id whose async outputs A kept: once B takes it, A's old outputs go with A's record.
    url = f"{gateway.url}/predictions/expiring-async-id"
    assert requests.put(url, json=QUICK, headers={**A, **ASYNC}, timeout=30).status_code == 202
    output = wait_until_finished(gateway, "expiring-async-id", A)["output"]
    assert requests.get(f"{gateway.url}{output}", headers=A, timeout=10).status_code == 200
    for kept in ("ids/expiring-async-id", "states/expiring-async-id.json"):
        os.utime(gateway.run_dir / "predictions" / kept, (past, past))
    assert requests.put(url, json=QUICK, headers=B, timeout=30).status_code == 200
    assert requests.get(f"{gateway.url}{output}", headers=B, timeout=10).status_code == 404


# -- 5. only coglet can write states -----------------------------------------------------------------------


def test_the_events_listener_takes_only_the_webhook_url_the_gateway_gave_coglet(gateway):
    started = post(gateway, {**A, **ASYNC}, {"input": {"sleep_s": 0.1}}).json()
    finished = wait_until_finished(gateway, started["id"], A)
    events = f"http://127.0.0.1:{gateway.events_port}/events"
    forged = {"id": started["id"], "status": "succeeded", "output": "data:text/plain;base64,Rk9SR0VE"}
    attempts = {
        "no secret": requests.post(events, json=forged, timeout=5),
        "id only": requests.post(f"{events}/{started['id']}", json=forged, timeout=5),
        "wrong secret": requests.post(f"{events}/{started['id']}/{'0' * 32}", json=forged, timeout=5),
        "unknown id": requests.post(f"{events}/nobody-started-this/{'0' * 32}", json={"id": "x"}, timeout=5),
    }
    assert {name: r.status_code for name, r in attempts.items()} == {
        "no secret": 404,
        "id only": 403,
        "wrong secret": 403,
        "unknown id": 403,
    }
    assert wait_until_finished(gateway, started["id"], A) == finished
    store = gateway.run_dir / "predictions"
    assert not [path for path in store.rglob("*") if "nobody-started-this" in path.name]
    # The secret never reaches a log.
    record = json.loads((store / "ids" / started["id"]).read_text())
    assert record["secret"] not in gateway.log()


# -- 8. what the open routes and the logs give away ---------------------------------------------------------


def test_the_open_health_check_gives_the_status_only_and_a_key_gets_the_rest(gateway):
    open_answer = requests.get(f"{gateway.url}/health-check", timeout=10)
    assert open_answer.status_code == 200 and open_answer.json() == {"status": "READY"}
    keyed = requests.get(f"{gateway.url}/health-check", headers=A, timeout=10).json()
    assert keyed["status"] == "READY" and "setup" in keyed and "version" in keyed


def test_query_strings_are_refused_and_never_logged(gateway):
    for path in ("/openapi.json?api_key=SECRET-IN-QUERY-1", "/predictions?key=SECRET-IN-QUERY-2"):
        response = requests.get(f"{gateway.url}{path}", headers=A, timeout=10)
        assert response.status_code == 400 and "Authorization: Bearer" in error_of(response)
    time.sleep(0.2)  # the access log is written as the answer goes out
    assert "SECRET-IN-QUERY" not in gateway.log()
    assert '"GET /openapi.json" 400' in gateway.log()


def test_every_answer_carries_the_security_headers(gateway):
    for path in ("/", "/docs/", "/static/playground.js", "/openapi.json", "/no-such-path"):
        headers = requests.get(f"{gateway.url}{path}", timeout=10).headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
