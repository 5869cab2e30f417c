"""Extraction across processes launched by ``torchrun``: every rank computes its share of shards.

The samples are cut into the same shards as a single-process run (see
:mod:`featx.cache.partial`); rank r takes every W-th pending shard and writes it to the
shared ``.partial`` directory, and rank 0, which holds the entry's lock, assembles the entry
once all ranks are done. Only decisions (hit or build, the plan, errors, the final path) go
through ``torch.distributed``; features go through the filesystem, so the cache directory must
be shared by all ranks (one node, or a network filesystem).

Before any forward pass the ranks check that they agree: on the entry's key (a node-local copy
of the dataset with other modification times gives another key), on the extraction plan, and
on the cache directory (rank 0 writes a random token there that every other rank must read).
No rank waits for a peer for ever: collectives time out after ``FEATX_DIST_TIMEOUT`` seconds,
and the long waits (a forward pass, rank 0 assembling the entry) end with an error when a
peer's heartbeat in the shared cache directory has not moved for that long.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .._distributed import DEFAULT_TIMEOUT, config_differences, dist_timeout
from .._distributed import ProcessGroup as BaseGroup
from .._distributed import current_group as _current_group
from ..cache.entry import FeatureEntry
from ..cache.partial import PartialRun
from ..cache.store import CacheStore
from ..errors import FeatxError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT", "ProcessGroup", "config_differences", "current_group", "dist_timeout",
           "extract_in_group", "open_shared_run", "compute_together", "assemble_on_main"]


@dataclass
class ProcessGroup(BaseGroup):
    """A rank of an extraction: rank 0's decisions and the long waits are bounded by heartbeats."""

    failure_note: ClassVar[str] = "the shards already written are kept and the next identical run resumes from them."
    #: per-run directory in the shared cache holding heartbeats; set by ``check_shared_dir``
    session: Path | None = None
    _phase: int = 0
    _beats: int = 0
    _last_beat: float = field(default=0.0, repr=False)

    def on_main(self, fn):
        """Collective: ``fn()`` runs on rank 0 only; its result (or its error) reaches every rank.

        The others wait for it with a bound on how long rank 0 may show no sign of life."""
        result, error = None, None
        if self.is_main:
            try:
                with self.beating():
                    result = fn()
            except BaseException as exc:  # re-raised below, after the others heard of it
                error = exc
        self.wait_for_peers()
        self.raise_any(error)
        return self.broadcast(result)

    # ------------------------------------------------------------ agreement before computing

    def check_shared_dir(self, root: Path) -> None:
        """Collective: every rank must see the cache directory rank 0 writes to.

        Rank 0 writes a random token into ``root``; the others read it after a barrier. Starts
        the heartbeat session used to bound later waits."""
        def write_token() -> str:
            token = secrets.token_hex(16)
            session = Path(root) / ".dist" / token
            session.mkdir(parents=True, exist_ok=True)
            (session / "token").write_text(token)
            return token

        token = self.on_main_quick(write_token)
        session = Path(root) / ".dist" / token
        try:
            seen = (session / "token").read_text() == token
        except OSError:
            seen = False
        everyone = self.gather((seen, str(root)))
        blind = [(r, where) for r, (ok, where) in enumerate(everyone) if not ok]
        if blind:
            if self.is_main:
                shutil.rmtree(session, ignore_errors=True)
            listing = "; ".join(f"rank {r} uses {where}" for r, where in blind)
            raise FeatxError(
                f"The cache directory is not shared by all ranks: rank 0 wrote a token into {everyone[0][1]} that "
                f"other ranks cannot see ({listing}). Ranks exchange features through the cache directory: "
                "point --cache-dir (or FEATX_CACHE_DIR) of every rank at one shared directory."
            )
        self.session = session
        self.beat(force=True)

    def on_main_quick(self, fn):
        """``on_main`` for short work that needs no heartbeat (before the session exists)."""
        return BaseGroup.on_main(self, fn)

    def close_session(self) -> None:
        """Rank 0 removes the heartbeat files once every rank is past its last wait."""
        if self.is_main and self.session is not None:
            shutil.rmtree(self.session, ignore_errors=True)
        self.session = None

    # ------------------------------------------------------------ liveness

    def beat(self, force: bool = False) -> None:
        """Show the others that this rank makes progress (throttled to a few writes a minute)."""
        if self.session is None:
            return
        now = time.monotonic()
        if not force and now - self._last_beat < min(2.0, self.timeout / 5):
            return
        self._last_beat = now
        self._beats += 1
        try:
            (self.session / f"beat-{self.rank}").write_text(str(self._beats))
        except OSError as exc:  # the others will notice the silence
            log.warning("cannot write heartbeat: %s", exc)

    @contextlib.contextmanager
    def beating(self):
        """Heartbeats from a thread while the main thread is in one long call (lock, verify, assemble)."""
        stop = threading.Event()

        def loop():
            while not stop.wait(min(1.0, self.timeout / 5)):
                self.beat(force=True)

        thread = threading.Thread(target=loop, name="featx-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _read_beat(self, rank: int) -> str | None:
        try:
            return (self.session / f"beat-{rank}").read_text()
        except OSError:
            return None

    def wait_for_peers(self) -> None:
        """Arrive at the next meeting point and wait until every rank has; a peer whose heartbeat
        stands still for ``timeout`` seconds is hung or gone, and waiting ends with an error."""
        if self.session is None:
            return
        self._phase += 1
        mark = self.session / f"arrived-{self._phase}-{self.rank}"
        mark.write_text("")
        last = {r: (self._read_beat(r), time.monotonic()) for r in range(self.world)}
        waiting = set(range(self.world)) - {self.rank}
        while waiting:
            self.beat()
            waiting = {r for r in waiting if not (self.session / f"arrived-{self._phase}-{r}").exists()}
            now = time.monotonic()
            for r in sorted(waiting):
                value = self._read_beat(r)
                if value != last[r][0]:
                    last[r] = (value, now)
                elif now - last[r][1] > self.timeout:
                    raise FeatxError(
                        f"Rank {r} has shown no sign of progress for {self.timeout:.0f} s (FEATX_DIST_TIMEOUT): it is "
                        "hung or gone, so this rank stops instead of waiting for ever. The shards already written "
                        "are kept and the next identical run resumes from them; raise FEATX_DIST_TIMEOUT if single "
                        "batches legitimately take longer."
                    )
            if waiting:
                time.sleep(0.2)

def current_group() -> ProcessGroup | None:
    """The torchrun process group this process belongs to, initialised on first use (gloo: only
    decisions go through it, features go through the shared cache directory)."""
    return _current_group(ProcessGroup)


# ------------------------------------------------------------------ one extraction across the ranks


def extract_in_group(group: ProcessGroup, store: CacheStore, key: str, config: dict, *,
                     cached: Callable[[], FeatureEntry | None], base: Callable[[], FeatureEntry | None],
                     opened: Callable[[Path], FeatureEntry],
                     build: Callable[[FeatureEntry | None], FeatureEntry]) -> FeatureEntry:
    """Rank 0 decides under the entry's lock (hit, or which entry to extend); every rank computes.

    First every rank checks that all agree on the key and share the cache directory: a rank
    with another key would write shards of another entry, found out only at assembly.
    ``cached()`` and ``base()`` run on rank 0 only; a hit is then ``opened`` on every rank,
    otherwise every rank calls ``build`` with the entry to extend (or None)."""
    group.agree("cache key", key, config)
    group.check_shared_dir(store.root)
    try:
        with contextlib.ExitStack() as held:
            if group.is_main:
                with group.beating():  # another process may hold the lock for a while
                    held.enter_context(store.lock(key))

            def decide() -> tuple[str, str | None]:
                hit = cached()
                if hit is not None:
                    return "hit", str(hit.path)
                found = base()
                return "build", str(found.path) if found is not None else None

            verdict, path = group.on_main(decide)
            if verdict == "hit":
                return opened(Path(path))
            return build(FeatureEntry(Path(path)) if path is not None else None)
    finally:
        group.close_session()


def open_shared_run(group: ProcessGroup, store: CacheStore, key: str, plan: dict) -> tuple[PartialRun, set[int]]:
    """The ranks agree on the plan; rank 0 opens the partial run first (it may discard one of
    another plan), then the others. Returns the run and the shards already on disk."""
    group.agree("extraction plan", plan, plan)
    done = set(group.on_main(lambda: store.partial(key, plan).done()))
    return store.partial(key, plan), done


def compute_together(group: ProcessGroup, compute: Callable[[], None]) -> None:
    """Run this rank's ``compute``, then wait for every rank (bounded: a hung peer ends the wait
    with an error); every rank stops when one failed, and the shards written are kept."""
    error = None
    try:
        compute()
    except BaseException as exc:
        error = exc
    group.wait_for_peers()
    group.raise_any(error)


def assemble_on_main(group: ProcessGroup, assemble: Callable[[], FeatureEntry]) -> FeatureEntry:
    """Rank 0 writes the entry; the others open what it wrote."""
    return FeatureEntry(Path(group.on_main(lambda: str(assemble().path))))
