"""User API middlewares (OpenAI error bodies, request metrics) and the capped body reader."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from node.errors import NodeError, PayloadTooLarge
from node.keys import metrics_key, settings_key

log = logging.getLogger(__name__)


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: NodeError) -> web.Response:
    """A JSON error response with the error's status (and Retry-After when busy)."""
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return web.json_response(
        error_body(exc.message, exc.error_type, exc.code, exc.param), status=exc.status, headers=headers
    )


_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI error body with the right status; never a traceback."""
    try:
        return await handler(request)
    except NodeError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            # aiohttp raises it from request.read() with the request's own cap (the exception does not keep it).
            return error_response(PayloadTooLarge(f"request body is larger than {request.client_max_size} bytes"))
        error_type = _HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
        body = error_body(exc.reason, error_type, exc.reason.lower().replace(" ", "_"))
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(body, status=exc.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body("internal error", "server_error", "internal_error"), status=500)


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Count requests by endpoint and status, and time them."""
    metrics = request.config_dict[metrics_key]  # the node app's, also for the peer sub-app's requests
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started_s = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (web.HTTPException, NodeError) as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.request_latency.labels(endpoint).observe(time.perf_counter() - started_s)


async def read_body(request: web.Request) -> bytes:
    """The request body, refusing early when the declared length is over the cap."""
    cap = request.config_dict[settings_key].max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"request body is larger than {cap} bytes")
    return await request.read()
