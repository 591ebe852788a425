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


def main() -> None:
    asyncio.run(admission.main(200_000, 10_000))
    asyncio.run(ingress.main(200_000, 10_000))
    lane.run()  # one round trip: the hot calls' connection against redis-py's
    asyncio.run(executor.main())
    asyncio.run(cpu_split.main())  # the CPU of a run, per process
    asyncio.run(serve.main())  # the same in one process (`supersede serve`)
    asyncio.run(saq_ref.main())  # SAQ's figures, then supersede's against them
    asyncio.run(cancel_storm.main())
    asyncio.run(isolation.main())  # cancel -> a worker process stopped
    asyncio.run(cluster.main())
    asyncio.run(ops.main())


if __name__ == "__main__":
    main()
