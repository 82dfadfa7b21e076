"""One Settings object, loaded from defaults, a TOML file, the environment and CLI flags (in that order)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from node.errors import InvalidRequest
from node.serving.catalog import default_models_dir

DEFAULT_PORT = 8470
DEFAULT_MODEL = "smollm2-135m"
ENV_PREFIX = "EXPERTMESH_"


def default_data_dir() -> Path:
    """Where the node keeps its key, database and learned state."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "expertmesh"


@dataclass(frozen=True)
class Settings:
    """Everything a node can be told; every field has a documented default."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    models_dir: Path = field(default_factory=default_models_dir)
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    experts: tuple[str, ...] = ()  # specialist definitions (.toml paths or shipped names), beside <data_dir>/experts/
    n_ctx: int = 2048
    n_threads: int | None = None  # None: llama.cpp's own choice
    n_gpu_layers: int = -1  # -1: every layer, when llama.cpp was built with GPU offload
    # "auto": a child-process self-check decides (node/serving/selfcheck.py); true/false force safe CPU kernels on or off.
    safe_cpu_kernels: str | bool = "auto"
    queue_size: int = 8  # requests waiting per expert, beyond those holding a slot
    parallel: int | None = None  # sequence slots per expert (continuous batching); None: 8 with a GPU, 4 on a CPU
    max_body_bytes: int = 1 << 20
    max_tokens_default: int = 512
    log_level: str = "INFO"
    peers: tuple[str, ...] = ()  # bootstrap peer URLs
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()  # empty: every interface
    advertise_urls: tuple[str, ...] = ()  # empty: derived from host and port
    community_secret: str | None = None  # when set, every peer request must carry its HMAC
    peer_dead_after_s: float = 15.0
    hello_interval_s: float = 5.0
    # The approved set: node ids, expert ids, model names or families, sha256 (12+ hex prefix).
    approved: tuple[str, ...] = ()  # empty: every expert
    denied: tuple[str, ...] = ()
    local_only: bool = False
    min_scores: dict[str, float] = field(default_factory=dict)  # judged score per dimension, 0..1
    exploration: str = "squarecb"  # or "epsilon", "softmax"
    decompose_default: bool = False  # split compound `auto` queries unless a request says otherwise
    # A local instruct expert may propose a split the rules missed once its judged instruction score reaches this.
    decompose_proposer_min_score: float = 0.6
    judge_on_start: bool = True  # judge local experts in the background (a stored card is reused)
    judge_items_per_dimension: int | None = None  # None: every item of every suite
    judge_expert: str | None = None  # a local expert (id or name) that grades open-ended items; none: skipped
    api_key: str | None = None  # the user API key; see require_api_key
    require_api_key: bool | None = None  # None: required exactly when `host` is not loopback
    rate_limit_per_s: float = 50.0  # user API requests per client address
    rate_limit_burst: float = 100.0
    peer_rate_limit_per_s: float = 100.0  # peer API requests per peer address
    peer_rate_limit_burst: float = 200.0
    spot_check_interval_s: float = 300.0  # how often a random remote expert gets a probe (0: never)
    peer_idle_timeout_s: float = 60.0  # a peer sending no frame this long mid-answer is given up on
    peer_stream_deadline_s: float = 600.0  # no forwarded answer runs longer, however it trickles
    # Trust (see README "Trust in an open network"): judges whose cards count here besides this node's own.
    trusted_judges: tuple[str, ...] = ()  # node ids of judges whose cards count fully
    unverified_share_max: float = 0.1  # most `auto` traffic (probability) unverified remote experts may get
    verified_only: bool = False  # route `auto` to local or verified remote experts only
    ledger_plain_words: bool = False  # keep query words in the ledger as text (default: keyed hashes)
    ledger_retention_days: float = 90.0  # decisions older than this are deleted (0: kept forever)
    share_learning: bool = True  # publish the signed summary of what this node's users taught (README: Community learning)
    use_community_learning: bool = True  # weigh peers' summaries into routing
    # Relaying for nodes behind NAT (see node/mesh/relay.py): offer it on a public node, use it from home.
    relay: bool = False  # relay peer requests for admitted home nodes
    relay_open: bool = False  # relay for any node, not only those admitted with an invite
    relay_max_tunnels: int = 256
    relay_max_streams: int = 64  # relayed requests in flight at once, over all tunnels
    relay_max_bytes_per_s: float = 2_000_000.0  # relayed bytes per second, over all tunnels
    relays: tuple[str, ...] = ()  # relay URLs this node keeps a tunnel to (home nodes)
    join: tuple[str, ...] = ()  # invites to redeem (kept in the data dir once redeemed)


_INT_FIELDS = {
    "port",
    "n_ctx",
    "n_threads",
    "n_gpu_layers",
    "queue_size",
    "parallel",
    "max_body_bytes",
    "max_tokens_default",
    "judge_items_per_dimension",
    "relay_max_tunnels",
    "relay_max_streams",
}
_PATH_FIELDS = {"data_dir", "models_dir"}
_FLOAT_FIELDS = {
    "peer_dead_after_s",
    "hello_interval_s",
    "rate_limit_per_s",
    "rate_limit_burst",
    "peer_rate_limit_per_s",
    "peer_rate_limit_burst",
    "peer_idle_timeout_s",
    "spot_check_interval_s",
    "decompose_proposer_min_score",
    "relay_max_bytes_per_s",
    "peer_stream_deadline_s",
    "unverified_share_max",
    "ledger_retention_days",
}
_BOOL_FIELDS = {"mdns", "local_only", "judge_on_start", "require_api_key", "decompose_default", "relay", "relay_open"}
_BOOL_FIELDS |= {"share_learning", "use_community_learning"}  # community learning (node/routing/community.py)
_BOOL_FIELDS |= {"verified_only", "ledger_plain_words"}  # trust and ledger privacy
_LIST_FIELDS = {"models", "experts", "peers", "mdns_interfaces", "advertise_urls", "approved", "denied", "relays", "join"}
_LIST_FIELDS |= {"trusted_judges"}
_EXPLORATIONS = ("squarecb", "epsilon", "softmax")


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML/env/flag value into the field's type, with a clear error."""
    if name in _PATH_FIELDS:
        return Path(str(value)).expanduser()
    if name in _INT_FIELDS:
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"setting {name!r} must be an integer, got {value!r}", param=name) from exc
    if name in _FLOAT_FIELDS:
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"setting {name!r} must be a number, got {value!r}", param=name) from exc
        zero_ok = ("spot_check_interval_s", "decompose_proposer_min_score", "unverified_share_max", "ledger_retention_days")
        if number < 0 or (number == 0 and name not in zero_ok):
            raise InvalidRequest(f"setting {name!r} must be positive", param=name)
        return number
    if name in _BOOL_FIELDS:
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise InvalidRequest(f"setting {name!r} must be true or false, got {value!r}", param=name)
    if name in _LIST_FIELDS:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"setting {name!r} must be a list of strings", param=name)
        return tuple(value)
    if name == "safe_cpu_kernels":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise InvalidRequest(f"setting 'safe_cpu_kernels' must be \"auto\", true or false, got {value!r}", param=name)
    if name == "min_scores":
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value.values()
        ):
            raise InvalidRequest("setting 'min_scores' must be a table of dimension = number in [0, 1]", param=name)
        return {str(k): float(v) for k, v in value.items()}
    if not isinstance(value, str):
        raise InvalidRequest(f"setting {name!r} must be a string", param=name)
    if name == "exploration" and value not in _EXPLORATIONS:
        raise InvalidRequest(f"setting 'exploration' must be one of {', '.join(_EXPLORATIONS)}", param=name)
    return value


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file (its [node] table or top level), then EXPERTMESH_* env, then flags."""
    names = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError as exc:
            raise InvalidRequest(f"config file not found: {config_file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"config file {config_file} is not valid TOML: {exc}") from exc
        table = data.get("node", data)
        for key, value in table.items():
            if key not in names:
                raise InvalidRequest(f"unknown setting {key!r} in {config_file}", param=key)
            values[key] = _coerce(key, value)
    env = os.environ if environ is None else environ
    for key in names:
        env_value = env.get(ENV_PREFIX + key.upper())
        if env_value is not None and env_value != "" and key != "min_scores":
            values[key] = _coerce(key, env_value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    settings = Settings(**values)
    if not 0 <= settings.port <= 65535:
        raise InvalidRequest(f"port must be 0..65535, got {settings.port}", param="port")
    if settings.queue_size < 0:
        raise InvalidRequest("queue_size must be >= 0", param="queue_size")
    if settings.parallel is not None and not 1 <= settings.parallel <= 64:
        raise InvalidRequest("parallel must be 1..64 sequence slots", param="parallel")
    if not 0 <= settings.unverified_share_max <= 1:
        raise InvalidRequest("unverified_share_max must be within [0, 1]", param="unverified_share_max")
    if not settings.models:
        raise InvalidRequest("at least one model is needed", param="models")
    return settings
