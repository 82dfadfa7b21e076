"""One Settings object, loaded from defaults, a TOML file, the environment and CLI flags (in that order)."""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from node.errors import InvalidRequest
from node.serving.catalog import default_models_dir

DEFAULT_PORT = 8470
DEFAULT_MODEL = "smollm2-135m"
ENV_PREFIX = "EXPERTMESH_"


def default_data_dir() -> Path:
    """Where the node keeps its key, database and learned state."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "expertmesh"


ExpandedPath = Annotated[Path, AfterValidator(lambda path: path.expanduser())]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Names = tuple[str, ...]  # from the environment: comma-separated
Score = Annotated[float, Field(ge=0.0, le=1.0)]


# A pydantic dataclass: every field is validated on construction (also by `dataclasses.replace`), the types
# below are the only record of what a setting accepts, and pydantic's lax mode turns "9000" or "yes" into
# 9000 or True for values that come from the environment or a TOML file.
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Settings:
    """Everything a node can be told; every field has a documented default."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT
    data_dir: ExpandedPath = field(default_factory=default_data_dir)
    models_dir: ExpandedPath = field(default_factory=default_models_dir)
    models: Annotated[Names, Field(min_length=1)] = (DEFAULT_MODEL,)
    experts: Names = ()  # specialist definitions (.toml paths or shipped names), beside <data_dir>/experts/
    n_ctx: Annotated[int, Field(ge=1)] = 2048
    n_threads: Annotated[int, Field(ge=1)] | None = None  # None: llama.cpp's own choice
    n_gpu_layers: int = -1  # -1: every layer, when llama.cpp was built with GPU offload
    # "auto": a child-process self-check decides (node/serving/selfcheck.py); true/false force safe CPU kernels on or off.
    safe_cpu_kernels: Literal["auto"] | bool = "auto"
    queue_size: Annotated[int, Field(ge=0)] = 8  # requests waiting per expert, beyond those holding a slot
    # sequence slots per expert (continuous batching); None: 8 with a GPU, 4 on a CPU
    parallel: Annotated[int, Field(ge=1, le=64)] | None = None
    max_body_bytes: Annotated[int, Field(ge=1)] = 1 << 20
    max_tokens_default: Annotated[int, Field(ge=1)] = 512
    log_level: str = "INFO"
    peers: Names = ()  # bootstrap peer URLs
    mdns: bool = True
    mdns_interfaces: Names = ()  # empty: every interface
    advertise_urls: Names = ()  # empty: derived from host and port
    community_secret: str | None = None  # when set, every peer request must carry its HMAC
    peer_dead_after_s: Positive = 15.0
    hello_interval_s: Positive = 5.0
    # The approved set: node ids, expert ids, model names or families, sha256 (12+ hex prefix).
    approved: Names = ()  # empty: every expert
    denied: Names = ()
    local_only: bool = False
    # judged score per dimension, 0..1; env: JSON (`{"knowledge": 0.5}`) or `knowledge=0.5,code=0.7`
    min_scores: dict[str, Score] = field(default_factory=dict)
    exploration: Literal["squarecb", "epsilon", "softmax"] = "squarecb"
    decompose_default: bool = False  # split compound `auto` queries unless a request says otherwise
    # A local instruct expert may propose a split the rules missed once its judged instruction score reaches this.
    decompose_proposer_min_score: NonNegative = 0.6
    judge_on_start: bool = True  # judge local experts in the background (a stored card is reused)
    judge_items_per_dimension: Annotated[int, Field(ge=1)] | None = None  # None: every item of every suite
    judge_expert: str | None = None  # a local expert (id or name) that grades open-ended items; none: skipped
    api_key: str | None = None  # the user API key; see require_api_key
    require_api_key: bool | None = None  # None: required exactly when `host` is not loopback
    rate_limit_per_s: Positive = 50.0  # user API requests per client address
    rate_limit_burst: Positive = 100.0
    peer_rate_limit_per_s: Positive = 100.0  # peer API requests per peer address
    peer_rate_limit_burst: Positive = 200.0
    spot_check_interval_s: NonNegative = 300.0  # how often a random remote expert gets a probe (0: never)
    peer_idle_timeout_s: Positive = 60.0  # a peer sending no frame this long mid-answer is given up on
    peer_stream_deadline_s: Positive = 600.0  # no forwarded answer runs longer, however it trickles
    # Trust (see README "Trust in an open network"): judges whose cards count here besides this node's own.
    trusted_judges: Names = ()  # node ids of judges whose cards count fully
    unverified_share_max: Score = 0.1  # most `auto` traffic (probability) unverified remote experts may get
    verified_only: bool = False  # route `auto` to local or verified remote experts only
    ledger_plain_words: bool = False  # keep query words in the ledger as text (default: keyed hashes)
    ledger_retention_days: NonNegative = 90.0  # decisions older than this are deleted (0: kept forever)
    share_learning: bool = True  # publish the signed summary of what this node's users taught (README: Community learning)
    use_community_learning: bool = True  # weigh peers' summaries into routing
    # Relaying for nodes behind NAT (see node/mesh/relay.py): offer it on a public node, use it from home.
    relay: bool = False  # relay peer requests for admitted home nodes
    relay_open: bool = False  # relay for any node, not only those admitted with an invite
    relay_max_tunnels: Annotated[int, Field(ge=1)] = 256
    relay_max_streams: Annotated[int, Field(ge=1)] = 64  # relayed requests in flight at once, over all tunnels
    relay_max_bytes_per_s: Positive = 2_000_000.0  # relayed bytes per second, over all tunnels
    relays: Names = ()  # relay URLs this node keeps a tunnel to (home nodes)
    join: Names = ()  # invites to redeem (kept in the data dir once redeemed)


SETTING_NAMES = tuple(f.name for f in fields(Settings))
_TYPES = typing.get_type_hints(Settings)


def _from_env(name: str, text: str) -> Any:
    """An environment string in the shape the field's type takes: lists comma-separated, tables as JSON or k=v."""
    origin = typing.get_origin(_TYPES[name])
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if origin is dict:
        if text.lstrip().startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"setting {name!r} (from {ENV_PREFIX}{name.upper()}): not valid JSON: {exc}", param=name) from exc
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise InvalidRequest(
                f"setting {name!r} (from {ENV_PREFIX}{name.upper()}): expected JSON or key=value pairs separated by commas",
                param=name,
            )
        return {key.strip(): value.strip() for key, value in pairs}
    return text


def _check_score_types(values: Mapping[str, Any], source: Mapping[str, str]) -> None:
    # pydantic's lax float takes TOML `true` as 1.0; a bool is never a score.
    scores = values.get("min_scores")
    if isinstance(scores, dict) and any(isinstance(v, bool) for v in scores.values()):
        where = f" ({source['min_scores']})" if "min_scores" in source else ""
        raise InvalidRequest(f"setting 'min_scores'{where}: must be a table of dimension = number in [0, 1]", param="min_scores")


def _validated(values: dict[str, Any], source: dict[str, str]) -> Settings:
    """Settings from merged values, or InvalidRequest naming the first bad setting and where it came from."""
    _check_score_types(values, source)
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f" ({source[name]})" if name in source else ""
        got = f", got {error['input']!r}" if not isinstance(error.get("input"), (dict, Settings)) else ""
        raise InvalidRequest(f"setting {name!r}{where}: {error['msg']}{got}", param=name or None) from exc


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file (its [node] table or top level), then EXPERTMESH_* env, then flags."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError as exc:
            raise InvalidRequest(f"config file not found: {config_file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"config file {config_file} is not valid TOML: {exc}") from exc
        table = data.get("node", data)
        for key, value in table.items():
            if key not in SETTING_NAMES:
                raise InvalidRequest(f"unknown setting {key!r} in {config_file}", param=key)
            values[key], source[key] = value, f"in {config_file}"
    env = os.environ if environ is None else environ
    for key in SETTING_NAMES:
        env_value = env.get(ENV_PREFIX + key.upper())
        if env_value is not None and env_value != "":
            values[key], source[key] = _from_env(key, env_value), f"from {ENV_PREFIX}{key.upper()}"
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], source[key] = value, "from the command line"
    return _validated(values, source)


def overrides_from(args: object) -> dict[str, Any]:
    """The settings an argparse namespace gives: every attribute named like a setting and not None."""
    given = {name: getattr(args, name, None) for name in SETTING_NAMES}
    return {name: value for name, value in given.items() if value is not None}
