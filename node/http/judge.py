"""`/v1/experts` and `/v1/judge`: capability cards, and judging runs streamed as JSON lines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from node.errors import Forbidden, InvalidRequest, NodeError
from node.http.middleware import error_body, read_body
from node.http.models import resolve_expert
from node.http.schemas import ExpertList, JudgeRequest, json_response, parse_body
from node.judging.service import card_view
from node.keys import judging_key, pool_key


async def list_experts(request: web.Request) -> web.Response:
    """`GET /v1/experts`: every known expert with its capability cards by judge, flags and live figures."""
    judging = request.app[judging_key]
    rows = judging.experts_view()  # in-memory, verified once: cheap enough for the loop
    return json_response(ExpertList.model_validate({"object": "list", "data": rows}))


def _loopback_only(request: web.Request) -> None:
    """Judging runs cost minutes of model time: only a local client may start one."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = peer[0] if peer else ""
    if not (host.startswith("127.") or host == "::1"):
        raise Forbidden("judging can only be started from this machine")


async def judge(request: web.Request) -> web.StreamResponse:
    """`POST /v1/judge`: judge local experts (or a peer's), streaming progress as JSON lines, then the cards."""
    _loopback_only(request)
    body = parse_body(await read_body(request), JudgeRequest)
    judging = request.app[judging_key]
    pool = request.app[pool_key]
    if body.peer is None:
        experts = [resolve_expert(pool, body.expert)] if body.expert else list(pool)
    elif not body.expert:
        raise InvalidRequest("judging a peer needs the expert id", param="expert")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def progress(expert_id: str, done: int, total: int) -> None:
        lines.put_nowait({"type": "progress", "expert": expert_id, "done": done, "total": total})

    async def run() -> None:
        try:
            if body.peer is not None:
                assert body.expert is not None  # a peer's judging without an expert id was refused above
                signed = await judging.judge_peer(
                    body.peer, body.expert, dimensions=body.dimensions, items_per_dimension=body.items_per_dimension or 8, progress=progress
                )
                lines.put_nowait({"type": "card", "card": card_view(signed.card)})
            for expert in experts if body.peer is None else []:
                signed = await judging.judge_local(
                    expert, dimensions=body.dimensions, items_per_dimension=body.items_per_dimension, force=body.force, progress=progress
                )
                lines.put_nowait({"type": "card", "card": card_view(signed.card)})
        except NodeError as exc:
            lines.put_nowait({"type": "error", "error": error_body(exc.message, exc.error_type, exc.code)["error"]})
        finally:
            lines.put_nowait({"type": "end"})

    task = asyncio.create_task(run())
    try:
        while True:
            line = await lines.get()
            await response.write((json.dumps(line) + "\n").encode())
            if line["type"] == "end":
                break
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await response.write_eof()
    return response
