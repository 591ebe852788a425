"""What the forkserver of the step workers imports before it forks any (`ProcessPool`).

multiprocessing's forkserver imports its preload by module name, and passes over a name it
cannot import without a word. A workflow module given by its path is loaded under a name of
its own (`supersede.services.modules`), which no import finds: it was never preloaded, so
each new worker imported it, and supersede with it, on its first step, inside that step's
timeout (a module whose import took 3 s failed every run of a 2 s step, a probe). This module
imports the worker's own code, then the files the executor names in `STEP_MODULE_FILES`, under
the names the executor gave them; a file that fails here is imported again by the worker, on
its job, which reports the failure as the step's.
"""

from __future__ import annotations

import contextlib
import os

import orjson

from supersede.services.executor.isolation import STEP_MODULE_FILES  # (the workers' code)
from supersede.services.modules import import_module

for path in orjson.loads(os.environ.pop(STEP_MODULE_FILES, "") or "[]"):  # (not the steps')
    with contextlib.suppress(BaseException):
        import_module(path)
