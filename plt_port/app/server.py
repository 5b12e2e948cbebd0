"""The HTTP server over `runtimes.engine.BatchEngine` (FastAPI): OpenAI's and Anthropic's APIs.

Routes: OpenAI's `POST /v1/completions` and `POST /v1/chat/completions` (`openai_api.py`),
Anthropic's `POST /v1/messages` and `POST /v1/messages/count_tokens` (`anthropic_api.py`),
`GET /v1/models` and `GET /v1/models/{id}` (with `max_model_len`), `GET`/`HEAD /health` and
`GET /metrics` (Prometheus text). Model ids name the loop count: `NAME` runs the default one,
`NAME@loops=K` runs K loops (so does the extra body field `"loops": K`).

Around every route (`ServerMiddleware`): the body's size (413 past `--max-request-bytes`) and
framing (Transfer-Encoding with Content-Length: 400, connection closed), the API key
(`--api-key`: `Authorization: Bearer KEY`, or `x-api-key: KEY` on the Anthropic routes; 401
without it on every route but /health), one request count by route and status, and one
access-log line (method, path, status, prompt and completion tokens, seconds). CORS only for
`--allowed-origins`.
Errors are OpenAI's error JSON, Anthropic's on the Anthropic routes.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from plt_port.errors import PLTError
from runtimes.engine import BatchEngine

from . import anthropic_api, openai_api
from .server_options import ServerOptions
from .service import APIError, Service, api_error

access_log = logging.getLogger("plt_port.app.access")

ANTHROPIC_PREFIX = "/v1/messages"
OPEN_PATHS = {"/health"}


def error_response(path: str, error: APIError) -> JSONResponse:
    api = anthropic_api if path.startswith(ANTHROPIC_PREFIX) else openai_api
    return api.error_response(error)


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"{param}: unknown field (not part of this API)", param=param)
    return APIError(400, f"{param or 'body'}: {first['msg']}", param=param)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes (the server's "
                         f"--max-request-bytes)", code="request_too_large")


async def bounded_body(receive, limit: int) -> bytes | None:
    """The request's body, read to its end unless it passes `limit` bytes (None then)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the route sees an empty body
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replayed(body: bytes, receive):
    """An ASGI `receive` that gives `body` first, then what the client sends (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class ServerMiddleware:
    """ASGI middleware: the request's framing and size (`--max-request-bytes`, 413 past it),
    the API key, one count and one access-log line per request."""

    def __init__(self, app, service: Service, paths: set[str]):
        self.app, self.service, self.paths = app, service, paths

    def authorized(self, scope, headers: dict[str, str]) -> bool:
        key = self.service.options.api_key
        if key is None or scope["path"] in OPEN_PATHS:
            return True
        offered = [headers.get("authorization", "").removeprefix("Bearer ").strip()]
        if scope["path"].startswith(ANTHROPIC_PREFIX):
            offered.append(headers.get("x-api-key", "").strip())
        return any(hmac.compare_digest(k.encode(), key.encode()) for k in offered if k)

    def refusal(self, headers: dict[str, str]) -> APIError | None:
        """What refuses a request before its body is read (None: nothing)."""
        if "transfer-encoding" in headers and "content-length" in headers:
            # RFC 9112 6.3: a request smuggling attempt behind a proxy; answer, then close
            return APIError(400, "a request with both Transfer-Encoding and Content-Length")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.service.max_request_bytes:
            return too_large(self.service.max_request_bytes)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.service.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                       for name, value in scope["headers"]}
            error = self.refusal(headers)
            body = None if error else \
                await bounded_body(receive, self.service.max_request_bytes)
            if error is None and body is None:
                error = too_large(self.service.max_request_bytes)
            if error is not None:  # the body is left unread: the connection ends here
                response = error_response(scope["path"], error)
                response.headers["connection"] = "close"
                await response(scope, receive, observed_send)
            elif not self.authorized(scope, headers):
                error = APIError(401, "a valid API key is required (Authorization: Bearer "
                                      "KEY, or x-api-key on /v1/messages)",
                                 "authentication_error", code="invalid_api_key")
                await error_response(scope["path"], error)(scope, receive, observed_send)
            else:
                await self.app(scope, replayed(body, receive), observed_send)
        finally:
            generation = scope.get("state", {}).get("generation")
            tokens = f"prompt={generation.prompt_tokens} completion=" \
                     f"{generation.completion_tokens}" if generation else "prompt=- completion=-"
            access_log.info('%s "%s %s" %d %s %.3fs', (scope.get("client") or ("-",))[0],
                            scope["method"], scope["path"], status[0], tokens,
                            time.perf_counter() - start)


def create_app(engine: BatchEngine, tokenizer, model_name: str,
               options: ServerOptions | None = None) -> FastAPI:
    app = FastAPI(title="plt-port", docs_url=None, redoc_url=None, openapi_url=None)
    service = Service(engine, tokenizer, model_name, options or ServerOptions())
    app.state.service = service
    app.state.metrics = service.metrics

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(PLTError)
    async def on_bad_request(request, exc: PLTError):
        return error_response(request.url.path, api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        return error_response(request.url.path, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc: HTTPException):
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_internal_error(request, exc: Exception):
        return error_response(request.url.path, api_error(exc))

    openai_api.add_routes(app, service)
    anthropic_api.add_routes(app, service)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card(i) for i in service.model_ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        service.loops_for(model_id, None)  # 404 for an unknown id
        return service.model_card(model_id)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        status = "ok" if engine.alive else "stopped"
        return JSONResponse({"status": status, "running": engine.running_count,
                             "queued": engine.queued_count},
                            status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ServerMiddleware, service=service,
                       paths={route.path for route in app.routes})
    if service.options.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(service.options.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app
