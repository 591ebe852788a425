"""`make bench`: every benchmark, one BENCH line each."""

from __future__ import annotations

import asyncio

from bench import (
    admission,
    cancel_storm,
    cluster,
    cpu_split,
    executor,
    ingress,
    isolation,
    lane,
    ops,
    saq_ref,
    serve,
)
from bench.common import cpu_latency_holdable, log, no_arguments


def main() -> None:
    asyncio.run(admission.main(200_000, 10_000))
    asyncio.run(ingress.main(200_000, 10_000))
    lane.run()  # one round trip: the hot calls' connection against redis-py's
    asyncio.run(executor.main())
    asyncio.run(cpu_split.main())  # the CPU of a run, per process
    asyncio.run(serve.main())  # the same in one process (`supersede serve`)
    asyncio.run(saq_ref.main())  # SAQ's figures, then supersede's against them
    if cpu_latency_holdable():  # the start latency with the CPUs held out of deep idle
        asyncio.run(serve.main(held=True))  # (SUPERSEDE_CPU_LATENCY_US=0)
        asyncio.run(saq_ref.main(held=True))  # (the same condition, held by the bench)
    else:
        log("held start latency skipped: /dev/cpu_dma_latency is not writable (needs root)")
    asyncio.run(cancel_storm.main())
    asyncio.run(isolation.main())  # cancel -> a worker process stopped
    asyncio.run(cluster.main())
    asyncio.run(ops.main())


if __name__ == "__main__":
    no_arguments(__doc__)
    main()
