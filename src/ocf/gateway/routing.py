"""Choosing a provider for ``/v1/service/<name>/...``: pure functions over node table entries.

A provider is one peer's record of a service in the node table (OCF's
shape: ``{"name": "llm", "status": "healthy", "identity_group":
["model=m1"], ...}``). Identity groups are ``key=value`` strings; a request
names its identity through top-level JSON body fields with those keys (OCF
routes on ``model``) or an ``X-OCF-Identity-Group: key=value`` header.

Everything here is free of I/O so routing decisions are unit-tested on plain
dictionaries; :mod:`ocf.gateway.providers` adds liveness and :mod:`ocf.gateway.forward` load.
"""

from __future__ import annotations

import json
import random
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import attrs

from ..errors import NoRoutableIdentity, NotFound

#: Service statuses that mean "do not send requests here" (the registrar
#: writes ``healthy``/``unhealthy``; OCF entries may carry others).
UNUSABLE_SERVICE_STATUSES = frozenset({"unhealthy", "down", "offline", "starting", "stopped", "error"})
#: Entry statuses of peers that left or are known to be gone.
GONE_ENTRY_STATUSES = frozenset({"offline", "left", "disconnected", "gone", "dead"})


def _groups_of(service: Mapping[str, Any]) -> frozenset[str]:
    groups = service.get("identity_group") or ()
    return frozenset(g for g in groups if isinstance(g, str))


@attrs.frozen
class Provider:
    peer: str
    service: Mapping[str, Any] = attrs.field(eq=False)
    entry: Mapping[str, Any] = attrs.field(eq=False)
    local: bool = False
    #: The service's identity groups (``{"model=m1"}``), read once: routing checks them per request.
    groups: frozenset[str] = attrs.field(
        eq=False, default=attrs.Factory(lambda self: _groups_of(self.service), takes_self=True)
    )

    @property
    def healthy(self) -> bool:
        status = str(self.service.get("status") or "healthy").lower()
        return status not in UNUSABLE_SERVICE_STATUSES

    @property
    def online(self) -> bool:
        """The table does not say this peer is gone (liveness proper is the transport's call)."""
        if self.local:
            return True
        if self.entry.get("connected") is False:
            return False
        return str(self.entry.get("status") or "").lower() not in GONE_ENTRY_STATUSES


def _services_of(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    services = entry.get("service") or entry.get("services") or []
    return [s for s in services if isinstance(s, Mapping) and isinstance(s.get("name"), str)]


def providers_of(entries: Mapping[str, Mapping[str, Any]], name: str, self_peer: str) -> list[Provider]:
    """Every peer's record of service ``name``, in table order."""
    out = []
    for peer, entry in entries.items():
        for service in _services_of(entry):
            if service["name"] == name:
                out.append(Provider(peer, service, entry, local=peer == self_peer))
    return out


def known_services(entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({s["name"] for entry in entries.values() for s in _services_of(entry)})


def split_group(group: str) -> tuple[str, str] | None:
    key, sep, value = group.partition("=")
    if not sep or not key.strip():
        return None
    return key.strip(), value.strip()


def identity_keys(providers: Iterable[Provider]) -> list[str]:
    """The keys a request to these providers can route on (``["model"]`` for LLMs)."""
    keys = set()
    for provider in providers:
        for group in provider.groups:
            pair = split_group(group)
            if pair:
                keys.add(pair[0])
    return sorted(keys)


def identity_values(providers: Iterable[Provider], key: str) -> list[str]:
    values = set()
    for provider in providers:
        for group in provider.groups:
            pair = split_group(group)
            if pair and pair[0] == key:
                values.add(pair[1])
    return sorted(values)


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return None  # objects and arrays do not name identities


def identity_from_json(body: Any, keys: Iterable[str]) -> dict[str, str]:
    """The identity a JSON request body names: its top-level scalar fields among ``keys``."""
    if not isinstance(body, Mapping):
        return {}
    out = {}
    for key in keys:
        if key in body:
            value = _scalar(body[key])
            if value is not None:
                out[key] = value
    return out


def identity_from_headers(values: Iterable[str]) -> dict[str, str]:
    """``X-OCF-Identity-Group: model=m1, region=eu`` (header may repeat). Raises BadRequest if malformed."""
    from ..errors import BadRequest

    out = {}
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            pair = split_group(part)
            if pair is None:
                raise BadRequest(
                    f"X-OCF-Identity-Group must be key=value pairs, got {part.strip()!r}", code="bad_identity_header"
                )
            out[pair[0]] = pair[1]
    return out


def matches(provider: Provider, identity: Mapping[str, str]) -> bool:
    groups = provider.groups
    return all(f"{k}={v}" in groups for k, v in identity.items())


def select(
    providers: list[Provider],
    identity: Mapping[str, str],
    *,
    service: str,
    known: Callable[[], list[str]],
    has_body: bool,
    keys: list[str] | None = None,
) -> list[Provider]:
    """Providers of ``service`` matching ``identity``, or the honest error.

    Raises :class:`NotFound` (unknown service, or no provider has this
    identity: the message lists what exists) or :class:`NoRoutableIdentity`
    (the service routes by identity but the request body names none).
    Availability is not judged here. ``known()`` lists the services in the
    network (for the error message only, so it is not computed otherwise).
    ``keys`` are ``identity_keys(providers)`` if the caller already has them.
    """
    if not providers:
        listing = ", ".join(known()) or "none"
        raise NotFound(
            f"no provider offers service '{service}' (services in the network: {listing})", code="service_not_found"
        )
    if keys is None:
        keys = identity_keys(providers)
    if not identity:
        if keys and has_body:
            raise NoRoutableIdentity(
                f"service '{service}' routes by {' or '.join(keys)}, but the request names none "
                f'(add a top-level JSON field such as "{keys[0]}" or an X-OCF-Identity-Group: {keys[0]}=<value> header)'
            )
        return list(providers)
    found = [p for p in providers if matches(p, identity)]
    if not found:
        wanted = ", ".join(f"{k} '{v}'" for k, v in identity.items())
        parts = []
        for key in identity:
            values = identity_values(providers, key)
            parts.append(f"{key}: {', '.join(values) if values else 'none'}")
        code = "model_not_found" if "model" in identity else "identity_not_found"
        raise NotFound(f"no provider of service '{service}' serves {wanted} (available {'; '.join(parts)})", code=code)
    return found


def choose(candidates: list[Provider], in_flight: Mapping[str, int], rng: random.Random) -> Provider:
    """Fewest requests in flight wins; ties are broken at random so load spreads."""
    if len(candidates) == 1:
        return candidates[0]
    best = min(in_flight.get(p.peer, 0) for p in candidates)
    return rng.choice([p for p in candidates if in_flight.get(p.peer, 0) == best])
