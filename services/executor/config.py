"""Settings of one executor process (the CLI's `supersede executor` flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ExecutorConfig:
    slots: int = 10  # runs executed at once
    lease_ms: int = 10_000  # a run's lease; the heartbeat renews it every sixth
    grace: float = 5.0  # seconds a cancelled run may take before its slot is reported free
    kill_after: float = 2.0  # process isolation: seconds from SIGTERM to SIGKILL
    drain_timeout: float = 30.0  # seconds SIGTERM waits for running runs
    block_ms: int = 1000  # longest wait of one read
    # take over assignments another executor read and left unclaimed this long: an idle one
    # frozen in its blocking read held a new run for the whole wait (30 s before)
    claim_idle_ms: int = 2_000
    retry_backoff: float = 0.1  # seconds before a step's first retry, doubled each time
    retry_backoff_max: float = 30.0  # the longest wait before a step's retry
    max_output_bytes: int = 65_536  # a run's step outputs, msgpack-encoded, stored with it
    # leave results to admission (the executor's Redis user then needs no state rights)
    results_via_stream: bool = False
