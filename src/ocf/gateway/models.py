"""``GET /v1/service/llm/v1/models``: the models the network's healthy providers serve.

Answered by the entry gateway from its node table, without a hop: each
model lists the peers that serve it, skipping providers that are unhealthy,
offline, or that this gateway failed to reach lately.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import unquote

from ..errors import NotFound
from . import routing
from ..web.asgi import Responder


async def serve_models(
    responder: Responder, providers: list[routing.Provider], model_id: str, is_down: Callable[[str, float], bool]
) -> None:
    """Answer the list, or the one model ``model_id`` (404 if no provider serves it)."""
    now = time.monotonic()
    by_model: dict[str, list[str]] = {}
    for provider in providers:
        if not (provider.healthy and provider.online):
            continue
        if not provider.local and is_down(provider.peer, now):
            continue
        for value in routing.identity_values([provider], "model"):
            by_model.setdefault(value, []).append(provider.peer)
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": "ocf", "providers": sorted(peers)}
        for model, peers in sorted(by_model.items())
    ]
    if model_id:
        model_id = unquote(model_id)
        for item in data:
            if item["id"] == model_id:
                await responder.json(200, item)
                return
        raise NotFound(
            f"no provider serves model '{model_id}' (available: {', '.join(by_model) or 'none'})",
            code="model_not_found",
        )
    await responder.json(200, {"object": "list", "data": data})
