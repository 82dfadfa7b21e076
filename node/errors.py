"""One error root for the node, with narrow subclasses that carry their HTTP status."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(NodeError):
    """The client sent something malformed; `param` names the offending field."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(NodeError):
    """The request lacks a valid credential."""

    status = 401
    error_type = "authentication_error"
    code = "unauthorized"


class Forbidden(NodeError):
    """The credential is valid but does not allow this."""

    status = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(NodeError):
    """The named resource does not exist."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """No expert with that id is known to this node."""

    code = "model_not_found"


class Conflict(NodeError):
    """The request conflicts with what was already recorded."""

    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(NodeError):
    """The request body is over the configured cap."""

    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ExpertBusy(NodeError):
    """The expert's queue is full; retry after `retry_after_s`."""

    status = 429
    error_type = "rate_limit_error"
    code = "expert_busy"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PeerUnavailable(NodeError):
    """A peer could not be reached or failed mid-request."""

    status = 502
    error_type = "upstream_error"
    code = "peer_unavailable"


class ExpertFailed(NodeError):
    """The model failed while generating."""

    status = 500
    error_type = "server_error"
    code = "expert_failed"


class CatalogError(NodeError):
    """A model could not be resolved, fetched or verified."""

    code = "catalog_error"


class UpgradeRequired(NodeError):
    """The peer speaks a protocol version this node does not."""

    status = 426
    error_type = "invalid_request_error"
    code = "unsupported_protocol_version"


class RateLimited(NodeError):
    """A client sent more requests than its budget; retry after `retry_after_s`."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
