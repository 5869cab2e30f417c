"""Run one call in a fresh child process, with this process's featx logging.

``featx run`` extracts, then probes. Extraction loads torch (its libraries alone are about
400 MB resident) and leaves the heap of a forward pass behind; the probe's parent only
coordinates its workers. Extracting in a child that exits before the probe starts kept the
parent of the main job's probe at about 150 MB instead of about 1 GB.
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


def _logging_state() -> tuple[int, str | None, bool]:
    logger = logging.getLogger("featx")
    handler = next((h for h in logger.handlers if isinstance(h, logging.StreamHandler)), None)
    fmt = handler.formatter._fmt if handler is not None and handler.formatter is not None else None
    return logger.level, fmt, logger.propagate


def _call_with_logging(state: tuple[int, str | None, bool], fn, args, kwargs):
    import sys

    level, fmt, propagate = state
    logger = logging.getLogger("featx")
    if fmt is not None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
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
