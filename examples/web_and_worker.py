"""Web processes that only enqueue, an `offload worker` that performs: one SQLite file.

    python examples/web_and_worker.py          # a self-contained run (stand-in API)

The web process is told `consume=False` (say, because its requests must not share a core
with the calls): each `enqueue_task` appends the task to the store's journal and returns.
Here it is killed with SIGKILL right after its last enqueue, as an OOM kill or a crashed
deploy would, before anything was delivered. Then `offload worker` (the command; in
production, a systemd unit or a container of its own) opens the same file, picks up what
the dead process left, delivers it, and exits 0 on SIGTERM.

In your app:

    offload.configure(store="sqlite:////var/lib/app/offload.db", consume=False)
    offload.enqueue_task(offload.http("POST", url, json=body, idempotency_key=True))

and beside it: `offload worker --store sqlite:////var/lib/app/offload.db --workers 4`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

CALLS = 20

# The web process: enqueue, then die without a chance to do anything else.
WEB = """
import os, signal, offload
offload.configure(store={store!r}, consume=False)
for n in range({calls}):
    offload.enqueue_task(
        offload.http("POST", {url!r}, json={{"signup": n}}, idempotency_key=f"signup-{{n}}")
    )
print("enqueued", {calls}, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def main() -> None:
    from _local_api import LocalAPI, Request

    everything = threading.Event()
    seen: set[str] = set()

    def respond(request: Request) -> tuple[int, dict[str, str], object]:
        seen.add(request.headers["idempotency-key"])
        if len(seen) == CALLS:
            everything.set()
        return 200, {}, {}

    with LocalAPI(respond) as api, tempfile.TemporaryDirectory() as directory:
        store = f"sqlite:///{Path(directory) / 'offload.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        code = textwrap.dedent(WEB.format(store=store, calls=CALLS, url=f"{api.url}/signups"))
        web = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        print(web.stdout.strip(), "| web process:", signal.Signals(-web.returncode).name)
        print("delivered before the worker started:", len(api.received))

        worker = subprocess.Popen(
            [sys.executable, "-m", "offload", "worker", "--store", store, "--workers", "2"],
            env=env,
        )
        try:
            delivered = everything.wait(30)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        once = delivered and len(api.received) == CALLS
        print(f"delivered by the worker: {len(seen)} of {CALLS}, each once: {once}")
        print("worker exit code:", worker.returncode)
        stats = subprocess.run(
            [sys.executable, "-m", "offload", "stats", "--store", store],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        print(stats.stdout.strip())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
