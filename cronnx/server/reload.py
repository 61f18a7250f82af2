"""Reloading the config while serving: on SIGHUP, and for the admin API."""

from __future__ import annotations

import asyncio
import logging

from cronnx.config import ConfigError, NotInConfig, load_config
from cronnx.engine.registry import Registry
from cronnx.models import catalog
from cronnx.models.catalog import Key, PreparedVersion

log = logging.getLogger("cronnx.server")


class Reloader:
    """Re-reads the config and applies it to the registry: on SIGHUP, and for the admin API.
    `overrides` are the command line's server options (`cronnx serve --model-repository DIR`),
    applied to every reading as at start-up."""

    def __init__(self, registry: Registry, config_path: str, overrides: dict[str, object] | None = None):
        self.registry = registry
        self.config_path = config_path
        self.overrides = overrides or {}

    async def reload(self, only: str | None = None, force: bool = False) -> None:
        """Serve what the config file says now (for one model, or all). Raises ConfigError when the
        file is unusable; a model that fails is recorded in the registry and changes nothing else.

        The last reload, load or unload started wins, whatever order they end in: this one takes
        its ticket before it reads anything (`Registry.begin`), and changes nothing of a model that
        a later one covers, even if this one ends last. Everything a version is made of is read
        again (the model's bytes, its labels, its settings): a version whose bytes changed is
        replaced even if the file's size and time did not."""
        ticket = self.registry.begin(None if only is None else {only})
        try:
            config = await asyncio.to_thread(load_config, self.config_path, **self.overrides)
            # Reading the repository touches the disk (a network volume, for KServe): not on the event loop.
            models, refused = await asyncio.to_thread(catalog.model_configs, config, self.config_path)
            if only is not None:
                models = [m for m in models if m.config.name == only]
                refused = {key: reason for key, reason in refused.items() if key[0] == only}
                if not models and not refused:
                    raise NotInConfig(f"{self.config_path}: model {only!r} is not in the config")
        except BaseException:
            self.registry.abandon(ticket)  # it decided nothing: the requests before it still do
            raise
        try:
            await self._prepare_and_apply(models, refused, only, ticket, force)
        finally:
            self.registry.finish(ticket)

    async def _prepare_and_apply(self, models, refused: dict[Key, str], only: str | None, ticket: int,
                                 force: bool) -> None:
        """Read every version of `models` and apply them for `ticket` (`reload`)."""
        prepared: list[PreparedVersion] = []
        failed: dict[Key, str] = dict(refused)
        for model, where, in_repository in models:
            try:
                versions = await asyncio.to_thread(catalog.versions_of, model, where, in_repository)
            except ConfigError as exc:
                failed[(model.name, model.version)] = str(exc)
                continue
            for version in versions:
                if self.registry.superseded(ticket, version.name):
                    break  # a later request decides this model: reading its file would be wasted
                try:
                    # Opening a model (or building the demo) takes a while: not on the event loop.
                    prepared.append(await asyncio.to_thread(catalog.prepare, version))
                except ConfigError as exc:
                    failed[(version.name, version.version)] = str(exc)
        names = {m.config.name for m in models} | {name for name, _ in refused}
        if only is None:
            # Models gone from the file are unloaded, and their old load failures forgotten.
            # So are those of the first load still to begin, which this reload supersedes.
            names |= (set(self.registry.routes) | {name for name, _ in self.registry.failed}
                      | {name for name, _ in self.registry.pending})
        await self.registry.apply(prepared, failed, names, ticket, force=force)

    async def on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload failed, keeping the models served now: %s", exc)
        except Exception:
            log.exception("reload failed, keeping the models served now")
