"""Gateway configuration: one `Settings` built from CLI flags > `LORAGATE_*` env vars > a YAML file > defaults.

Nested fields use `__` in env names: `LORAGATE_ENGINES__COUNT=2`, `LORAGATE_ROUTING__OVERLOAD_THRESHOLD=16`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.routing import Policy
from gateway.security import SecuritySettings


class AdapterSlots(BaseModel):
    """The engines' adapter capacity, managed or external: vLLM's --max-loras (distinct adapters in one batch),
    --max-cpu-loras (its LRU CPU cache; default max_loras) and --max-lora-rank, and what the gateway keeps
    registered on each."""

    max_loras: int = Field(default=4, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    # Adapters the gateway keeps registered on an engine (loaded through vLLM's runtime API, not unloaded). None: its
    # CPU slots. Above them vLLM's own LRU CPU cache drops and reloads registered adapters inside its steps, with no
    # runtime-API call (see "Registered beyond the CPU cache" in the README).
    max_registered_loras: int | None = Field(default=None, ge=1)
    max_lora_rank: int = Field(default=16, ge=1)

    @property
    def cpu_slots(self) -> int:
        return self.max_cpu_loras or self.max_loras

    @property
    def slots(self) -> int:
        """Adapters the gateway keeps registered on each engine (its residency ledger's capacity)."""
        return max(self.max_registered_loras or 0, self.cpu_slots)


class EngineSettings(AdapterSlots):
    """Managed mode: how the vLLM children are started and kept alive."""

    count: int = Field(default=1, ge=1)
    enable_lora: bool = True
    # None: the base model's own context length (config.json `max_position_embeddings`), at most max_model_len_cap,
    # which keeps a long-context base within a small KV cache.
    max_model_len: int | None = Field(default=None, ge=16)
    max_model_len_cap: int = Field(default=8192, ge=16)
    # vLLM --tool-call-parser: "auto" picks it from the base's chat template (see engine_process.tool_call_parser_for),
    # "none" starts the engines without one (every `tools` request is then refused by vLLM), or a vLLM parser name.
    tool_call_parser: str = Field(default="auto", min_length=1)
    # vLLM --enable-auto-tool-choice. None: on whenever a parser is in use (vLLM 0.32 uses the parser only then).
    enable_auto_tool_choice: bool | None = None
    # vLLM --chat-template (a file or the template itself), for a base whose own template does not render tools.
    chat_template: str | None = None
    dtype: str = "bfloat16"
    kv_cache_gib: int = 1
    # Appended to every managed engine's vLLM command line / set in its environment (override the keys above).
    extra_args: list[str] = []
    extra_env: dict[str, str] = {}
    start_timeout_s: float = 300.0
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    max_restarts: int = Field(default=5, ge=0)
    log_dir: Path | None = None


class ExternalSettings(AdapterSlots):
    """External mode: engines that someone else runs (pods), by URL and/or a DNS name that lists them."""

    urls: list[str] = []
    discovery_host: str | None = None
    discovery_file: Path | None = Field(default=None, description="one engine URL per line, re-read every interval")
    discovery_port: int = 8000
    discovery_scheme: str = "http"
    discovery_interval_s: float = 10.0


class RoutingSettings(BaseModel):
    """Placement (gateway.routing): v2 keeps each engine's working set inside its GPU slots and gives hot adapters
    more engines; v1 is the earlier holder-first placement, kept for comparison."""

    placement: Literal["v2", "v1"] = "v2"
    max_queue: int = Field(default=256, ge=1, description="queue depth on every engine above which requests get 503")
    load_bucket: int = Field(default=4, ge=1, description="loads in one bucket tie; rendezvous order decides")
    replica_min_load: float = Field(default=4.0, gt=0, description="v2: requests an adapter needs for a 2nd engine")
    shrink_ratio: float = Field(default=0.5, gt=0, le=1, description="v2: an engine fewer below this part of a share")
    replica_hold_s: float = Field(default=10.0, ge=0, description="v2: at most one engine fewer this often")
    slot_wait_s: float = Field(default=0.5, ge=0, description="v2: a GPU-slot wait this long gets one handed over")
    max_loading_fraction: float = Field(default=0.5, gt=0, le=1, description="v2: engines loading at once")
    working_set_cap: bool = Field(
        default=True, description="v2: hold requests in the gateway past max_loras adapters in flight per engine"
    )
    working_set_slack: int = Field(
        default=0, ge=0, description="v2: adapters in flight per engine beyond max_loras (queued in vLLM, ready)"
    )
    evict: Literal["lru", "demand"] = Field(
        default="lru", description="which resident adapter a load evicts: the least recently used, or least wanted"
    )
    overload_threshold: int = Field(default=8, ge=1, description="v1: queue depth above which a holder is passed over")

    def policy(self) -> Policy:
        return Policy(
            overload_threshold=self.overload_threshold,
            max_queue=self.max_queue,
            load_bucket=self.load_bucket,
            placement=self.placement,
            replica_min_load=self.replica_min_load,
            shrink_ratio=self.shrink_ratio,
            replica_hold_s=self.replica_hold_s,
            slot_wait_s=self.slot_wait_s,
            max_loading_fraction=self.max_loading_fraction,
            working_set_cap=self.working_set_cap,
            working_set_slack=self.working_set_slack,
            evict=self.evict,
        )


class AdapterSettings(BaseModel):
    pinned: list[str] = []
    load_timeout_s: float = 120.0
    # A name seen before resolves from memory; an answer older than this is refreshed in the background while it
    # still serves, so an alias moved elsewhere (another replica, the CLI) is seen within about this long.
    resolve_ttl_s: float = Field(default=2.0, ge=0)
    # False when the engines fill their own adapter cache (the chart's S3 mode, with the adapter-sync sidecar on each
    # engine pod): the gateway then only names the folder, instead of downloading every version it routes to a disk
    # of its own that nothing reads.
    materialize: bool = True
    # Adapters each engine loads before it takes traffic (when it starts, restarts or joins): references, or glob
    # patterns over adapter names ("*": every one), most wanted first. An engine loads those whose rendezvous home it
    # is and that no engine holds yet, into its free CPU slots, never evicting (gateway.adapters.prewarm).
    prewarm: list[str] = []
    prewarm_timeout_s: float = Field(default=300.0, ge=0, description="no prewarm load starts after this long")


class UpstreamSettings(BaseModel):
    connect_timeout_s: float = 5.0
    read_timeout_s: float = Field(default=600.0, gt=0, description="longest wait for the engine's next bytes")
    # Requests in flight to the engines at once; past it a completion is refused at once (503 engines_busy).
    max_connections: int = Field(default=512, ge=1)
    # Idle engine connections are closed after this. Below the engines' own keep-alive (vLLM: 5 s), so the gateway
    # never sends a request on a connection the engine is closing.
    keepalive_s: float = Field(default=2.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAGATE_", env_nested_delimiter="__", extra="forbid")

    mode: Literal["managed", "external"] = "managed"
    base: str | None = Field(default=None, description="registry base name or a model directory")
    base_name: str | None = Field(default=None, description="served base name (default: registry or dir name)")
    host: str = "127.0.0.1"
    port: int = 8000
    registry: str | None = None
    engines: EngineSettings = Field(default_factory=EngineSettings)
    external: ExternalSettings = Field(default_factory=ExternalSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    health_interval_s: float = 2.0
    # Processes serving the completion routes (`--workers`): one gateway pod uses this many cores (gateway.workers)
    workers: int = Field(default=1, ge=1, le=64)
    usage_webhook_url: str | None = None
    metrics_max_adapter_labels: int = 50
    # Serve /metrics on this port (same host) instead of the API port, e.g. a scrape port kept off the Ingress.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    drain_grace_s: float = 30.0
    # How long an idle client connection stays open. Above the idle timeouts of clients and load balancers (httpx and
    # the OpenAI SDK: 5 s; AWS ALB: 60 s), so the gateway never closes a connection a client is about to reuse.
    keep_alive_s: int = Field(default=75, ge=1)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @model_validator(mode="after")
    def _check_mode(self) -> Settings:
        if self.mode == "managed" and not self.base:
            raise ValueError("managed mode needs `base` (a registry base name or a model directory)")
        ext = self.external
        if self.mode == "external" and not (ext.urls or ext.discovery_host or ext.discovery_file):
            raise ValueError("external mode needs `external.urls`, `external.discovery_host` or `discovery_file`")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"`metrics_port` {self.metrics_port} is the API port: give /metrics a port of its own")
        if self.mode == "external" and not (self.base or self.base_name):
            raise ValueError("external mode needs `base_name` (the engines' served model name) or `base`")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config` (YAML), the environment and `overrides` (highest precedence; None values skipped)."""
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"{config}: no such config file")
    cleaned = {key: value for key, value in overrides.items() if value is not None}

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config})

    return _FromFile(**cleaned)
