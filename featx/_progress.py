"""Progress bars that suit both a terminal and a log file.

In a terminal a bar redraws several times a second; redirected to a file (CI, ``nohup``,
a batch scheduler) every redraw becomes a new line, so a long extraction would write
thousands of them. Off a TTY the bar refreshes at most every ``LOG_INTERVAL`` seconds.
"""

from __future__ import annotations

import sys

LOG_INTERVAL = 30.0


def progress_bar(*, total: int, desc: str | None, unit: str, disable: bool = False, **kwargs):
    from tqdm.auto import tqdm

    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    if not interactive:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
