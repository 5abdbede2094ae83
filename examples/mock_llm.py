#!/usr/bin/env python
"""A small OpenAI-compatible LLM server for trying ocf out (and for its tests).

    python examples/mock_llm.py --port 8080 --model m1 --model m2

Serves ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``
and ``POST /v1/completions``, with and without ``"stream": true``
(server-sent events, one token per event, ending with ``data: [DONE]``).
The "model" answers deterministically: ``[<model>] you said: <your last
message>``, so you can see which worker answered and that your text made the
round trip intact. ``--token-delay`` spaces the streamed tokens out so you
can watch them arrive.

It is an example program (a stand-in for vLLM, llama.cpp or Ollama), not a
part of ocf: Quart-Trio on Hypercorn, like ocf's own gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any
from collections.abc import AsyncIterator

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, jsonify, request
from quart_trio import QuartTrio


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> Response:
    response = jsonify(error={"message": message, "type": kind, "param": None, "code": code})
    response.status_code = status
    return response


def tokens_of(text: str) -> list[str]:
    """Split into word tokens that concatenate back to ``text`` exactly."""
    out: list[str] = []
    current = ""
    for char in text:
        current += char
        if char.isspace():
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out or [""]


def reply_for(model: str, prompt: str) -> str:
    return f"[{model}] you said: {prompt}"


def _last_user_message(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def create_app(models: list[str], *, token_delay: float = 0.0, name: str = "mock-llm") -> QuartTrio:
    """The server's app. ``app.config["MODELS"]`` is the live model list (tests change it)."""
    app = QuartTrio(name)
    app.config["MODELS"] = list(models)
    app.config["TOKEN_DELAY"] = token_delay
    app.config["MAX_CONTENT_LENGTH"] = 64 << 20
    app.config["REQUESTS"] = 0
    app.config["STREAMS_CUT"] = 0
    app.config["STREAM_CUT"] = trio.Event()

    @app.get("/health")
    async def health():  # type: ignore[no-untyped-def]
        return jsonify(status="ok")

    @app.get("/v1/models")
    async def list_models():  # type: ignore[no-untyped-def]
        created = int(app.config.get("STARTED", time.time()))
        return jsonify(
            object="list",
            data=[{"id": m, "object": "model", "created": created, "owned_by": name} for m in app.config["MODELS"]],
        )

    async def _body() -> dict | Response:
        try:
            body = json.loads(await request.get_data())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_json")
        model = body.get("model")
        if model not in app.config["MODELS"]:
            return _error(
                404,
                f"The model `{model}` does not exist (this server has: {', '.join(app.config['MODELS'])})",
                "model_not_found",
            )
        app.config["REQUESTS"] += 1
        return body

    def _stream(chunks: list[dict]) -> Response:
        delay = app.config["TOKEN_DELAY"]

        async def events() -> AsyncIterator[bytes]:
            finished = False
            gate = app.config.get("TOKEN_GATE")  # tests hand out tokens one at a time through this channel
            try:
                for chunk in chunks:
                    if gate is not None:
                        await gate.receive()
                    yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
                    if delay:
                        await trio.sleep(delay)
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # the client went away mid-stream (tests watch for this)
                    app.config["STREAMS_CUT"] += 1
                    app.config["STREAM_CUT"].set()

        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None
        return response

    @app.post("/v1/chat/completions")
    async def chat():  # type: ignore[no-untyped-def]
        body = await _body()
        if isinstance(body, Response):
            return body
        model = body["model"]
        prompt = _last_user_message(body.get("messages"))
        text = reply_for(model, prompt)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {
            "prompt_tokens": len(tokens_of(prompt)),
            "completion_tokens": len(tokens_of(text)),
            "total_tokens": len(tokens_of(prompt)) + len(tokens_of(text)),
        }
        if body.get("stream"):
            base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            chunks = [
                dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            ]
            chunks += [
                dict(base, choices=[{"index": 0, "delta": {"content": tok}, "finish_reason": None}])
                for tok in tokens_of(text)
            ]
            chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            return _stream(chunks)
        return jsonify(
            id=ident,
            object="chat.completion",
            created=created,
            model=model,
            choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            usage=usage,
        )

    @app.post("/v1/completions")
    async def completions():  # type: ignore[no-untyped-def]
        body = await _body()
        if isinstance(body, Response):
            return body
        model = body["model"]
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = "".join(p for p in prompt if isinstance(p, str))
        text = reply_for(model, str(prompt))
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            base = {"id": ident, "object": "text_completion", "created": created, "model": model}
            chunks = [
                dict(base, choices=[{"index": 0, "text": tok, "logprobs": None, "finish_reason": None}])
                for tok in tokens_of(text)
            ]
            chunks.append(dict(base, choices=[{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]))
            return _stream(chunks)
        return jsonify(
            id=ident,
            object="text_completion",
            created=created,
            model=model,
            choices=[{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            usage={
                "prompt_tokens": len(tokens_of(str(prompt))),
                "completion_tokens": len(tokens_of(text)),
                "total_tokens": 0,
            },
        )

    @app.errorhandler(404)
    async def not_found(_exc: Exception):  # type: ignore[no-untyped-def]
        return _error(404, f"no route {request.method} {request.path}", "not_found")

    return app


async def serve(
    app: QuartTrio, host: str = "127.0.0.1", port: int = 8080, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app``; ``task_status.started()`` reports the bound port (useful with ``port=0``)."""
    config = HyperConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    app.config["STARTED"] = time.time()

    async def started(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A tiny OpenAI-compatible LLM server that echoes your messages.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model name to serve (repeat for several; default: mock-model)",
    )
    parser.add_argument(
        "--token-delay", type=float, default=0.0, metavar="SECONDS", help="pause between streamed tokens (default 0)"
    )
    args = parser.parse_args(argv)
    app = create_app(args.models or ["mock-model"], token_delay=args.token_delay)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, app, args.host, args.port)
            print(f"mock LLM serving {', '.join(app.config['MODELS'])} at http://{args.host}:{port}/v1", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # noqa: BLE001 - Hypercorn wraps bind errors in exception groups
        error = _find(exc, OSError)
        if error is None:
            raise
        print(
            f"mock_llm: cannot listen on {args.host}:{args.port}: {getattr(error, 'strerror', None) or error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _find(exc: BaseException, kind: type) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find(inner, kind)
        if found is not None:
            return found
    return None


if __name__ == "__main__":
    sys.exit(main())
