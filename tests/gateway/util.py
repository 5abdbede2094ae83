"""Helpers for gateway, services and integration tests: mock LLM servers and node configs."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from collections.abc import AsyncIterator

import attrs
import trio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_mock_llm():
    """``examples/mock_llm.py`` as a module (an example program, not part of the package)."""
    name = "ocf_example_mock_llm"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "mock_llm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@attrs.define
class MockLLM:
    app: object
    port: int
    scope: trio.CancelScope

    @property
    def models(self) -> list[str]:
        return self.app.config["MODELS"]

    @property
    def requests(self) -> int:
        return self.app.config["REQUESTS"]

    def stop(self) -> None:
        """Kill the server (its listening socket and every connection)."""
        self.scope.cancel()


@contextlib.asynccontextmanager
async def running_mock_llm(models: list[str], *, token_delay: float = 0.0, port: int = 0) -> AsyncIterator[MockLLM]:
    mock_llm = load_mock_llm()
    app = mock_llm.create_app(models, token_delay=token_delay)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run(*, task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await mock_llm.serve(app, "127.0.0.1", port, task_status=task_status)

        bound = await nursery.start(run)
        try:
            yield MockLLM(app, bound, scope)
        finally:
            nursery.cancel_scope.cancel()


def chat(model: str, text: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
