"""The services registrar: keeps this node's ``service`` list in the node table true.

For each ``--service.name/--service.port`` (a :class:`ocf.config.ServiceSpec`)
it health-checks ``http://<host>:<port>/health`` with backoff (up to 6000
tries before the first success, as OCF, without holding up node startup),
fetches ``/v1/models`` for ``llm`` services and publishes
``{"name": "llm", "identity_group": ["model=<id>", ...], "status": "healthy"}``
in the node's own entry. Unlike OCF it keeps polling afterwards, so a model
added or removed on the backend, or the backend going down, reaches the
table within one poll interval (10 s by default, never more than 30 s).

Internal services (the job tracker's ``jobs``) are registered with
:meth:`Registrar.register_internal` and served by this node's own gateway.

The table is written only when the published list changes, or when the
table's copy of our entry no longer lists it (then it is written again): the
node table keeps history, and polling must not grow it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import TYPE_CHECKING, Any
from collections.abc import AsyncIterator, Sequence

import attrs
import httpx
import trio

from .. import log as logfmt
from ..config import ServiceSpec
from ..errors import OcfError, ServiceRegistrationError
from ..ports import LLM_SERVICE, InternalService, LocalService

if TYPE_CHECKING:
    from ..ports import ServiceBoard

__all__ = ["LLM_SERVICE", "InternalService", "LocalService", "Registrar", "open_registrar"]

log = logging.getLogger("ocf.services")

MAX_POLL_INTERVAL = 30.0
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RESERVED_PREFIXES = ("/v1/service/", "/v1/_service/", "/v1/p2p/")


@attrs.define(eq=False)
class _Watched:
    spec: ServiceSpec
    status: str = "starting"  # starting -> healthy <-> unhealthy; "failed" after max tries without success
    models: tuple[str, ...] = ()
    ever_healthy: bool = False
    tries: int = 0
    rounds: int = 0
    checking: bool = False
    last_error: str = ""
    wake: trio.Event = attrs.field(factory=trio.Event)
    round_done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def is_llm(self) -> bool:
        return self.spec.name == LLM_SERVICE


class Registrar:
    """Watches local services and publishes them; see the module docstring.

    ``poll_interval`` and ``max_health_tries`` are attributes so tests (and
    embedders) can tune them; :meth:`refresh` checks immediately.
    """

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        table: ServiceBoard | None,
        client: httpx.AsyncClient,
        *,
        poll_interval: float = 10.0,
        max_health_tries: int = 6000,
    ) -> None:
        self.table = table  # None: no node table here, the gateway still serves /v1/_service locally
        self.client = client
        self.poll_interval = min(poll_interval, MAX_POLL_INTERVAL)
        self.max_health_tries = max_health_tries
        self.initial_backoff = 0.25
        self._watched: dict[str, _Watched] = {s.name: _Watched(s) for s in specs}
        self._internal: dict[str, InternalService] = {}
        self._published: list[dict] | None = None
        self._dirty = trio.Event()
        self._publish_generation = 0
        self._published_generation = 0
        self._published_event = trio.Event()

    # --- lookups used by the gateway --------------------------------------------------

    def lookup(self, name: str) -> LocalService | InternalService | None:
        watched = self._watched.get(name)
        if watched is not None:
            return LocalService(name, watched.spec.host, watched.spec.port, watched.spec.api_key)
        return self._internal.get(name)

    def names(self) -> list[str]:
        return sorted(set(self._watched) | set(self._internal))

    def status(self, name: str) -> str | None:
        watched = self._watched.get(name)
        if watched is not None:
            return watched.status
        return "healthy" if name in self._internal else None

    def models(self, name: str = LLM_SERVICE) -> list[str]:
        watched = self._watched.get(name)
        return list(watched.models) if watched else []

    def records(self) -> list[dict]:
        """The ``service`` list as published (services never seen healthy are left out)."""
        out = []
        for watched in self._watched.values():
            if not watched.ever_healthy:
                continue
            out.append(
                {
                    "name": watched.spec.name,
                    "host": watched.spec.host,
                    "port": watched.spec.port,
                    "status": "healthy" if watched.status == "healthy" else "unhealthy",
                    "identity_group": [f"model={m}" for m in watched.models] if watched.is_llm else [],
                }
            )
        for internal in self._internal.values():
            out.append({"name": internal.name, "host": "", "port": 0, "status": "healthy", "identity_group": []})
        return out

    # --- internal services --------------------------------------------------------------

    def register_internal(self, name: str, path_prefix: str) -> None:
        """Serve ``/v1/_service/<name>/<rest>`` from ``<path_prefix>/<rest>`` of this node's gateway."""
        if not _NAME.match(name):
            raise ServiceRegistrationError(f"service name {name!r} may only contain letters, digits, '-' and '_'")
        if name in self._watched or name in self._internal:
            raise ServiceRegistrationError(f"service {name!r} is already registered on this node")
        prefix = "/" + path_prefix.strip("/")
        if prefix == "/" or any((prefix + "/").startswith(p) for p in _RESERVED_PREFIXES):
            raise ServiceRegistrationError(f"path prefix {path_prefix!r} cannot serve an internal service")
        self._internal[name] = InternalService(name, prefix)
        log.info("internal service registered %s", logfmt.kv(name=name, prefix=prefix))
        self._mark_dirty()

    def unregister_internal(self, name: str) -> None:
        if self._internal.pop(name, None) is not None:
            log.info("internal service unregistered %s", logfmt.kv(name=name))
            self._mark_dirty()

    # --- refresh ------------------------------------------------------------------------

    async def refresh(self, name: str | None = None) -> None:
        """Check the named (or every) service now and return once the result is published."""
        targets = [self._watched[name]] if name is not None else list(self._watched.values())
        for watched in targets:
            # A check already under way may have started before the caller's change: wait for the next one.
            target = watched.rounds + (2 if watched.checking else 1)
            while watched.rounds < target:
                watched.wake.set()
                await watched.round_done.wait()
        await self.wait_published()

    async def wait_published(self) -> None:
        """Return once everything marked so far has been written to the node table."""
        target = self._publish_generation
        while self._published_generation < target:
            await self._published_event.wait()

    # --- tasks --------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        self._publish_generation += 1
        self._dirty.set()

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            generation = self._publish_generation
            records = self.records()
            if records != self._published or self._withdrawn(records):
                try:
                    await self._write(records)
                    self._published = records
                except OcfError as exc:
                    log.error("cannot publish services %s", logfmt.kv(reason=exc))
            self._published_generation = generation
            self._published_event.set()
            self._published_event = trio.Event()

    def _withdrawn(self, records: list[dict]) -> bool:
        """Whether the table's copy of our entry lost a service we publish (an operator's DELETE, a bad write)."""
        table = self.table
        if table is None:
            return False
        listed = table.own_entry().get("service") or []
        have = {(s.get("name"), s.get("status")) for s in listed if isinstance(s, dict)}
        return any((r["name"], r["status"]) not in have for r in records)

    async def _watch_table(self) -> None:
        """Republish when our entry in the table stops listing what we publish.

        Polling the backends only notices changes on *their* side; without
        this, a service withdrawn from the table stayed withdrawn for good.
        """
        table = self.table
        if table is None:
            return
        while True:
            await table.wait_changed()
            if self._published and self._withdrawn(self._published):
                log.info(
                    "services missing from our entry; republishing %s",
                    logfmt.kv(services=",".join(r["name"] for r in self._published)),
                )
                self._mark_dirty()

    async def _write(self, records: list[dict]) -> None:
        table = self.table
        if table is None:
            return  # no node table on this node: the gateway still serves /v1/_service locally
        await table.set_services(records)
        log.info(
            "services published %s", logfmt.kv(services=",".join(f"{r['name']}:{r['status']}" for r in records) or "-")
        )

    async def _watch(self, watched: _Watched) -> None:
        backoff = self.initial_backoff
        while True:
            watched.checking = True
            try:
                healthy = await self._check(watched)
            finally:
                watched.checking = False
            gave_up = False
            if healthy:
                backoff = self.initial_backoff
                delay = self.poll_interval
            elif not watched.ever_healthy and watched.tries >= self.max_health_tries:
                gave_up = True
                watched.status = "failed"
                log.error(
                    "service never became healthy; giving up %s",
                    logfmt.kv(
                        name=watched.spec.name,
                        url=self._url(watched, "/health"),
                        tries=watched.tries,
                        reason=watched.last_error,
                    ),
                )
            else:
                delay = backoff
                backoff = min(backoff * 2, self.poll_interval)
            # The round is over only now, with the status final, so refresh() callers see its result.
            watched.rounds += 1
            watched.round_done.set()
            watched.round_done = trio.Event()
            if gave_up:
                await watched.wake.wait()  # only an explicit refresh() tries again
                watched.tries = 0
                backoff = self.initial_backoff
            else:
                with trio.move_on_after(delay):
                    await watched.wake.wait()
            watched.wake = trio.Event()

    def _url(self, watched: _Watched, path: str) -> str:
        host = watched.spec.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{watched.spec.port}{path}"

    async def _check(self, watched: _Watched) -> bool:
        """One health check (+ model list for LLMs); updates ``watched`` and marks changes for publishing."""
        watched.tries += 1
        before = (watched.status, watched.models)
        try:
            models = await self._probe(watched)
        except _ProbeFailed as exc:
            watched.last_error = str(exc)
            if watched.status == "healthy":
                log.warning("service unhealthy %s", logfmt.kv(name=watched.spec.name, reason=exc))
            elif watched.tries == 1 or math.log2(watched.tries).is_integer():
                log.info(
                    "waiting for service %s",
                    logfmt.kv(
                        name=watched.spec.name, url=self._url(watched, "/health"), tries=watched.tries, reason=exc
                    ),
                )
            watched.status = "unhealthy" if watched.ever_healthy else "starting"
        else:
            if watched.status != "healthy":
                log.info(
                    "service healthy %s",
                    logfmt.kv(name=watched.spec.name, url=self._url(watched, ""), models=",".join(models) or "-"),
                )
            elif models != watched.models:
                log.info("service models changed %s", logfmt.kv(name=watched.spec.name, models=",".join(models) or "-"))
            watched.status = "healthy"
            watched.models = models
            watched.ever_healthy = True
            watched.tries = 0
            watched.last_error = ""
        if (watched.status, watched.models) != before:
            self._mark_dirty()
        return watched.status == "healthy"

    async def _probe(self, watched: _Watched) -> tuple[str, ...]:
        key = watched.spec.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else None
        try:
            health = await self.client.get(self._url(watched, "/health"), headers=headers)
        except httpx.HTTPError as exc:
            raise _ProbeFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        if health.status_code >= 400 and not (health.status_code == 404 and watched.is_llm):
            raise _ProbeFailed(f"/health answered {health.status_code}")
        if not watched.is_llm:
            return ()
        # An LLM server without /health (404) still counts as up if it lists its models.
        try:
            listing = await self.client.get(self._url(watched, "/v1/models"), headers=headers)
        except httpx.HTTPError as exc:
            raise _ProbeFailed(f"/v1/models: {type(exc).__name__}: {exc}") from None
        if listing.status_code >= 400:
            raise _ProbeFailed(f"/v1/models answered {listing.status_code}")
        try:
            data = listing.json()
        except ValueError:
            raise _ProbeFailed("/v1/models did not answer JSON") from None
        return parse_models(data)


class _ProbeFailed(Exception):
    pass


def parse_models(data: Any) -> tuple[str, ...]:
    """Model IDs from an OpenAI ``/v1/models`` answer (sorted, unique; junk entries skipped)."""
    items = data.get("data") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise _ProbeFailed("/v1/models answer has no 'data' list")
    ids = set()
    for item in items:
        model = item.get("id") if isinstance(item, dict) else item
        if isinstance(model, str) and model and "," not in model and len(model) <= 256:
            ids.add(model)
    return tuple(sorted(ids))


@contextlib.asynccontextmanager
async def open_registrar(
    specs: Sequence[ServiceSpec], table: ServiceBoard | None, *, poll_interval: float = 10.0
) -> AsyncIterator[Registrar]:
    """Start watching ``specs`` (``--service.*``), publishing to ``table``; leaving the block stops the watchers."""
    timeout = httpx.Timeout(5.0, connect=2.0)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as client:
        registrar = Registrar(specs, table, client, poll_interval=poll_interval)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registrar._publisher)
            nursery.start_soon(registrar._watch_table)
            for watched in registrar._watched.values():
                nursery.start_soon(registrar._watch, watched)
            try:
                yield registrar
            finally:
                nursery.cancel_scope.cancel()
