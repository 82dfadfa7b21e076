"""`/v1/feedback`, `/v1/decisions/{id}` and `/v1/router/stats`: what the router learns from and shows."""

from __future__ import annotations

from aiohttp import web

from node.http.middleware import read_body
from node.http.schemas import (
    Candidate,
    Decision,
    Feedback,
    FeedbackRequest,
    RouterStats,
    json_response,
    parse_body,
)
from node.keys import router_key
from node.routing.router import RATINGS


async def feedback(request: web.Request) -> web.Response:
    """`POST /v1/feedback`: rate a routed answer; stored first, then learned."""
    body = parse_body(await read_body(request), FeedbackRequest)
    if body.rating is not None:
        reward = RATINGS[body.rating]
    else:
        assert body.reward is not None  # FeedbackRequest's validator wants exactly one of rating and reward
        reward = body.reward
    router = request.app[router_key]
    await router.feedback(body.decision_id, body.token, reward)
    return json_response(
        Feedback(decision_id=body.decision_id, reward=reward, recorded=True, policy_version=router.policy_version)
    )


async def get_decision(request: web.Request) -> web.Response:
    """`GET /v1/decisions/{id}`: a routing decision as recorded, with its reward."""
    decision, reward = await request.app[router_key].decision(request.match_info["decision_id"])

    def expert(index: int) -> Candidate:
        features = decision.candidates[index]
        return Candidate(
            expert=features.expert_id,
            node=features.node_id,
            local=features.local,
            probability=decision.probabilities[index],
        )

    assert decision.served_index is not None  # a Decision fills it with chosen_index when built without one
    return json_response(
        Decision(
            decision_id=decision.decision_id,
            created_ms=decision.created_ms,
            task=decision.query.task.value,
            policy_version=decision.policy_version,
            status=decision.status.value,
            chosen=expert(decision.chosen_index),
            served=expert(decision.served_index),
            fallback_reason=decision.fallback_reason,
            candidates=[expert(i) for i in range(len(decision.candidates))],
            reward=reward,
        )
    )


async def router_stats(request: web.Request) -> web.Response:
    """`GET /v1/router/stats`: reward over time and routing shares, for the learning view."""
    return json_response(RouterStats.model_validate(await request.app[router_key].stats()))
