"""Which model versions are served, which take traffic, and swapping them without losing a request.

A new or changed version is loaded and warmed up while the current one keeps serving; only
when all its workers are ready does it take the current one's place in the route. The replaced
version stops being chosen at once, finishes the requests that chose it, then its workers exit
and its shared memory is unlinked. A version that fails to load is recorded with the reason and
changes nothing else.

Reloads, loads and unloads decide a model in the order they started, not the order they end:
each takes a ticket when it starts (`Registry.begin`), and a result reaches a model only if no
later request covering that model has started (`Registry.apply`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Callable, Iterator

from cronnx.engine.admission import QueueMemory
from cronnx.engine.pool import VersionLoadFailed, ModelPool
from cronnx.errors import ModelNotFound, ModelNotReady
from cronnx.models.catalog import Key, PreparedVersion
from cronnx.observability.logs import LoggingSpec
from cronnx.workers.entry import run_worker
from cronnx.workers.process import WorkerTarget
from cronnx.workers.supervisor import BatchObserver, Liveness

log = logging.getLogger("cronnx.registry")


class ModelRoute:
    """The ready versions of one model name, and how its traffic is split between them."""

    def __init__(self, name: str):
        self.name = name
        self.versions: dict[int, ModelPool] = {}
        # version -> weight; None sends everything to the highest ready version.
        self.traffic: dict[int, float] | None = None

    def choose(self, key: str | None) -> ModelPool:
        """The version for a request; the same `key` always gets the same version."""
        if not self.versions:
            raise ModelNotReady(f"model {self.name!r} has no ready version (loading)")
        weighted = [(v, w) for v, w in sorted((self.traffic or {}).items()) if w > 0 and v in self.versions]
        if not weighted:
            return self.versions[max(self.versions)]
        total = sum(w for _, w in weighted)
        point = (_unit_hash(key) if key is not None else random.random()) * total
        for version, weight in weighted:
            point -= weight
            if point < 0:
                return self.versions[version]
        return self.versions[weighted[-1][0]]


def _one_per_key(prepared: list[PreparedVersion], failed: dict[Key, str]) -> tuple[list[PreparedVersion],
                                                                                  dict[Key, str]]:
    """`prepared` without the versions that share a key, which join `failed`. A version is loaded
    under its key: a second one would take the first's place while both load, and the first's
    workers would be left with no owner to stop them (the server would not exit on SIGTERM)."""
    paths: dict[Key, list[str]] = {}
    for p in prepared:
        paths.setdefault((p.model.name, p.model.version), []).append(p.model.path)
    shared = {key: files for key, files in paths.items() if len(files) > 1}
    if not shared:
        return prepared, failed
    failed = {**failed, **{key: f"{len(files)} model files are this version: {', '.join(files)}"
                           for key, files in shared.items()}}
    return [p for p in prepared if (p.model.name, p.model.version) not in shared], failed


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key: the same key lands on the same version in every process."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


class Registry:
    """Every model version the server runs, by name; `on_batch(name, version)` gives the observer
    of that version's batches (metrics). `liveness` says when a worker counts as hung;
    `queue_memory` bounds the bodies that waiting requests of all versions hold; `worker_target`
    is what worker processes run (see `ModelPool`)."""

    def __init__(self, logging_spec: LoggingSpec, on_batch: Callable[[str, str], BatchObserver],
                 load_timeout_s: float, liveness: Liveness, queue_memory: QueueMemory,
                 worker_target: WorkerTarget = run_worker):
        self.routes: dict[str, ModelRoute] = {}
        self.loading: dict[Key, ModelPool] = {}
        self.failed: dict[Key, str] = {}
        # Versions configured at start-up whose first load has not begun (a demo model still
        # being built): known, so that their routes answer 503 "loading" rather than 404.
        self.pending: set[Key] = set()
        self._draining: set[ModelPool] = set()
        self._drain_tasks: set[asyncio.Task] = set()
        self._logging_spec = logging_spec
        self._on_batch = on_batch
        self._load_timeout_s = load_timeout_s
        self._liveness = liveness
        self._queue_memory = queue_memory
        self._worker_target = worker_target
        self._lock = asyncio.Lock()
        self._generation = 0
        self._loaded_once = False
        # Model control in the order it was asked for (`begin`): each request's ticket and the
        # models it covers (None: every model, a full reload); a request that failed before it
        # decided anything gives its ticket back (`abandon`).
        self._tickets = 0
        self._covers: dict[int, set[str] | None] = {}
        # Tickets of the requests still in progress: only tickets after the oldest of them can
        # supersede anything, so the others' entries are dropped (`finish`).
        self._active: set[int] = set()

    def pools(self) -> Iterator[ModelPool]:
        """Every pool with workers: serving, loading or draining."""
        for route in self.routes.values():
            yield from route.versions.values()
        yield from self.loading.values()
        yield from self._draining

    def route(self, name: str) -> ModelRoute:
        """The model's route. Raises ModelNotReady (503) for a configured model whose first load
        has not begun, ModelNotFound for any other name not served."""
        route = self.routes.get(name)
        if route is None:
            if any(key[0] == name for key in self.pending):
                raise ModelNotReady(f"model {name!r} is loading")
            # A name no model can have (over 64 characters: config.MODEL_NAME_PATTERN) is shown
            # cut: a gRPC request's name may be megabytes long, and the message is logged too.
            shown = repr(name) if len(name) <= 64 else f"{name[:64]!r}... ({len(name)} characters)"
            raise ModelNotFound(f"unknown model {shown}; served models: {sorted(self.routes)}")
        return route

    def version(self, name: str, version: int) -> ModelPool:
        route = self.route(name)
        pool = route.versions.get(version)
        if pool is not None:
            return pool
        if (name, version) in self.loading:
            raise ModelNotReady(f"version {version} of model {name!r} is loading")
        raise ModelNotFound(f"version {version} of model {name!r} is not served; served: {sorted(route.versions)}")

    @property
    def loaded_once(self) -> bool:
        """The first load has finished (whatever it loaded)."""
        return self._loaded_once

    def ready(self) -> bool:
        """Loaded once, and every model that serves has a live worker."""
        serving = [route for route in self.routes.values() if route.versions]
        return self._loaded_once and bool(serving) and all(
            any(pool.live_workers for pool in route.versions.values()) for route in serving)

    def begin(self, names: set[str] | None = None) -> int:
        """Take the ticket of a reload (`names` None: every model) or of a load or unload of
        `names`, starting now. Of the requests that name a model, the last one started decides
        it: an earlier one still in progress applies nothing to it (see `apply`)."""
        self._tickets += 1
        self._covers[self._tickets] = None if names is None else set(names)
        self._active.add(self._tickets)
        return self._tickets

    def abandon(self, ticket: int) -> None:
        """The request that took `ticket` failed before deciding anything (an unreadable config,
        a model the config does not name): the requests started before it decide as if it had
        never started. A failed reload must not cancel the first load, or nothing would serve."""
        self._covers.pop(ticket, None)
        self.finish(ticket)

    def finish(self, ticket: int) -> None:
        """The request that took `ticket` has ended (`apply` calls it; so does a request that
        ends without applying). Safe to call twice."""
        self._active.discard(ticket)
        oldest = min(self._active, default=self._tickets + 1)
        for old in [t for t in self._covers if t < oldest]:
            del self._covers[old]

    def superseded(self, ticket: int, name: str) -> bool:
        """A request that started after ticket `ticket`, and did not give it back, covers model
        `name`."""
        return any(later > ticket and (names is None or name in names) for later, names in self._covers.items())

    async def apply(self, prepared: list[PreparedVersion], failed: dict[Key, str], names: set[str],
                    ticket: int | None = None, force: bool = False) -> None:
        """Make the served versions of the models in `names` exactly `prepared` (minus `failed`),
        for the request that took `ticket` (`begin`; None: a request for `names` starting now). Versions of `prepared` that share one
        (name, version) are all refused, with the reason.

        A model for which a later request has started is left to that request: this call's
        versions of it are not started, or are stopped if they started loading before the later
        request began, and its failures are not recorded. So a reload that read the config before
        another, or before an unload, cannot undo what the later one did, whichever ends first.
        Raises what cancels it (the server stops), after stopping the versions it started."""
        if ticket is None:
            ticket = self.begin(names)
        try:
            await self._apply(prepared, failed, names, ticket, force)
        finally:
            self.finish(ticket)

    async def _apply(self, prepared: list[PreparedVersion], failed: dict[Key, str], names: set[str], ticket: int,
                     force: bool) -> None:
        prepared, failed = _one_per_key(prepared, failed)
        async with self._lock:
            names = self._still_theirs(names, ticket)
            prepared = [p for p in prepared if p.model.name in names]
            failed = {key: reason for key, reason in failed.items() if key[0] in names}
            self.pending = {key for key in self.pending if key[0] not in names}
            # A model loading for the first time is known (503 "loading", not 404) while it loads.
            for name in names:
                self.routes.setdefault(name, ModelRoute(name))
            started: list[ModelPool] = []
            try:
                for p in prepared:
                    if force or self._changed(p):
                        try:
                            started.append(self._start(p))
                        except VersionLoadFailed as exc:  # its rings or workers could not be made: the others load
                            failed[(p.model.name, p.model.version)] = str(exc)
                results = await asyncio.gather(*(self._wait_ready(pool) for pool in started))
            except BaseException:
                # Cancelled (the server stops) or a start failed: stop what this call started.
                for pool in started:
                    self.loading.pop((pool.name, pool.version), None)
                    self._drain(pool)
                self._drop_empty_routes(names)
                raise
            # An unload (which does not wait for this lock) may have started while they loaded.
            current = self._still_theirs(names, ticket)
            for pool, error in zip(started, results):
                if pool.name in current:
                    self._promote(pool, error)
                else:
                    del self.loading[(pool.name, pool.version)]
                    self._drain(pool)
            self._record(prepared, failed, current)
            # Only this call makes routes while it holds the lock: an empty one is its own.
            self._drop_empty_routes(names)
            self._loaded_once = True

    def _still_theirs(self, names: set[str], ticket: int) -> set[str]:
        """The models of `names` that no request started after `ticket` covers."""
        later = {name for name in names if self.superseded(ticket, name)}
        if later:
            log.info("a later reload, load or unload covers model(s) %s: this one changes nothing of them",
                     ", ".join(sorted(later)))
        return names - later

    def _record(self, prepared: list[PreparedVersion], failed: dict[Key, str], names: set[str]) -> None:
        """The failures of the models of `names`, and their versions no longer configured retired."""
        prepared = [p for p in prepared if p.model.name in names]
        configured = {(p.model.name, p.model.version) for p in prepared} | set(failed)
        for key in [k for k in self.failed if k[0] in names and k not in configured]:
            del self.failed[key]  # no longer configured: its old failure is history
        for key, reason in failed.items():
            if key[0] in names:
                self.failed[key] = reason
                log.error("model %s version %d not loaded: %s", *key, reason)
        for name in names:
            self._retire(name, prepared, configured - set(failed))

    def _promote(self, pool: ModelPool, error: str | None) -> None:
        key = (pool.name, pool.version)
        del self.loading[key]
        if error is not None:
            self.failed[key] = error
            log.error("model %s version %d failed to load: %s; versions serving keep serving", *key, error)
            self._drain(pool)
            return
        self.failed.pop(key, None)
        route = self.routes[pool.name]
        previous = route.versions.get(pool.version)
        route.versions[pool.version] = pool
        pool.serving = True
        if previous is not None:
            self._drain(previous)
        log.info("model %s version %d is serving", *key)

    def _retire(self, name: str, prepared: list[PreparedVersion], wanted: set[Key]) -> None:
        """Drain the versions of `name` no longer configured, and set its traffic split."""
        route = self.routes[name]
        configs = [p.model.config for p in prepared if p.model.name == name]
        route.traffic = configs[0].traffic if configs else None
        if any(key[0] == name for key in self.failed):
            return  # a version meant to replace others did not load: the others keep serving
        for version in [v for v in route.versions if (name, v) not in wanted]:
            log.info("model %s version %d is no longer configured: draining", name, version)
            self._drain(route.versions.pop(version))

    def _drop_empty_routes(self, names: set[str]) -> None:
        """A model with no version serving is unknown (its failures stay visible in /models)."""
        for name in names:
            route = self.routes.get(name)
            if route is not None and not route.versions:
                del self.routes[name]

    async def unload(self, name: str) -> None:
        """Stop serving model `name` now: its versions drain, and a reload or load that started
        before this leaves it unloaded (`begin`). Does not wait for a reload in progress. Raises
        ModelNotFound for a model not served, ModelNotReady for one whose first load has not begun."""
        route = self.route(name)
        self.finish(self.begin({name}))  # its entry stays while an earlier request is in progress
        del self.routes[name]
        for pool in route.versions.values():
            self._drain(pool)
        log.info("model %s unloaded: draining %d version(s)", name, len(route.versions))

    async def close(self) -> None:
        """Stop everything (the HTTP side has already finished its requests)."""
        for route in self.routes.values():
            for pool in route.versions.values():
                self._drain(pool)
        self.routes.clear()
        for pool in self.loading.values():
            self._drain(pool)
        if self._drain_tasks:
            await asyncio.gather(*self._drain_tasks)

    def _changed(self, prepared: PreparedVersion) -> bool:
        model = prepared.model
        route = self.routes.get(model.name)
        current = route.versions.get(model.version) if route else None
        return current is None or current.fingerprint != prepared.fingerprint

    def _start(self, prepared: PreparedVersion) -> ModelPool:
        """The version's pool, its workers starting, in `loading`. Raises VersionLoadFailed when
        its rings or workers cannot be made, leaving nothing of it behind."""
        self._generation += 1
        model = prepared.model
        pool = ModelPool(prepared, self._generation, self._logging_spec,
                         self._on_batch(model.name, str(model.version)), self._liveness, self._queue_memory,
                         self._worker_target)
        self.loading[(model.name, model.version)] = pool
        try:
            pool.start()
        except BaseException:
            # It is not loading any more: the workers it did start are stopped.
            del self.loading[(model.name, model.version)]
            self._drain(pool)
            raise
        return pool

    async def _wait_ready(self, pool: ModelPool) -> str | None:
        try:
            await pool.wait_ready(self._load_timeout_s)
        except VersionLoadFailed as exc:
            return str(exc)
        return None

    def _drain(self, pool: ModelPool) -> None:
        self._draining.add(pool)
        task = asyncio.get_running_loop().create_task(self._finish(pool))
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    async def _finish(self, pool: ModelPool) -> None:
        try:
            await pool.drain()
        finally:
            self._draining.discard(pool)
            log.info("model %s version %d stopped", pool.name, pool.version)
