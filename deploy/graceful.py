"""Run Cog's server, holding SIGTERM back until no prediction runs: the drain for platforms that allow
no preStop hook.

    python /src/deploy/graceful.py python -m cog.server.http

On SIGTERM coglet 0.23 finishes a sync prediction but drops an async one (`Prefer: respond-async`)
within about 2 s: its webhook never gets the final `completed` event. On plain Kubernetes the preStop
hook (`probe.py drain`) waits first. Knative, and so KServe in Knative mode, refuses `lifecycle` hooks
on user containers, and its queue-proxy waits only for open HTTP requests, which an async prediction
is not. So there this script is the container's command: it starts the server as its child and, on
SIGTERM, waits as the preStop hook would (probe.drain: until the status is no longer BUSY) before
passing the signal on. The pod's termination grace period still bounds the wait.

Standard library only, like probe.py, so it runs in any image with the repository in /src.
"""

import os
import signal
import subprocess
import sys
import threading

import probe


def drain_then_stop(server: subprocess.Popen, port: int) -> None:
    probe.drain(port)
    server.send_signal(signal.SIGTERM)


def main(command: list[str]) -> int:
    if not command:
        print("usage: graceful.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    port = int(os.environ.get("PORT", probe.DEFAULT_PORT))
    server = subprocess.Popen(command)
    stopping = threading.Event()

    def on_sigterm(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=drain_then_stop, args=(server, port), daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C and the like: no drain, straight through.
    signal.signal(signal.SIGINT, lambda signum, frame: server.send_signal(signum))
    return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
