"""Run one call in a fresh child process, with this process's featx logging.

``featx run`` extracts, then probes. Extraction loads torch (its libraries alone are about
400 MB resident) and leaves the heap of a forward pass behind; the probe's parent only
coordinates its workers. Extracting in a child that exits before the probe starts kept the
parent of the main job's probe at 0.32 GiB instead of 0.97 GiB (PSS, benchmarks/bench_run.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor


def picklable(*objects) -> bool:
    try:
        pickle.dumps(objects)
    except Exception:  # noqa: BLE001 - any failure to pickle means "run it here"
        return False
    return True


def _logging_state() -> tuple:
    """The "featx" logger's level, propagation and stream handler's formatter (handlers do not pickle)."""
    logger = logging.getLogger("featx")
    handler = next((h for h in logger.handlers if isinstance(h, logging.StreamHandler)), None)
    return logger.level, logger.propagate, handler is not None, getattr(handler, "formatter", None)


def _call_with_logging(state: tuple, fn, args, kwargs):
    import sys

    level, propagate, has_handler, formatter = state
    logger = logging.getLogger("featx")
    if has_handler:  # the standard streams are inherited: log lines go where the parent's went
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = propagate
    return fn(*args, **kwargs)


def call_in_child(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a spawned process; its exceptions are raised here.

    ``fn`` and its arguments must pickle (check with :func:`picklable`). Standard streams are
    shared, so the child's progress bars and log lines appear as they would here.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_call_with_logging, _logging_state(), fn, args, kwargs).result()
