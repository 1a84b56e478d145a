"""The records the registry stores: one `AdapterManifest` per version, one `BaseManifest` per base, alias records.

Every record carries `schema_version`; readers accept versions up to `SCHEMA_VERSION` and ignore unknown keys so an
older reader can still read a newer record's known fields.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Serving = Literal["lora", "merge-only"]


def files_digest(files: dict[str, str]) -> str:
    """The version digest: sha256 over the sorted (relpath, file sha256) pairs."""
    listing = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(listing).hexdigest()


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"


class BaseMismatch(_Record):
    """A push accepted although the adapter says it was trained on another base (see provenance.py)."""

    declared: str  # adapter_config.json's base_model_name_or_path, as written
    evidence: Literal["path", "fingerprint", "name"]
    names: list[str]  # the registered bases the declaration matches (empty: a model that is none of them)
    differs: list[str] = Field(default_factory=list)  # fingerprint parts that differ from the bound base


class GoldenSet(_Record):
    """A version's golden prompts (adapters_registry/golden.py): a blob of `rows` chat prompts, `references` of
    them with the answer expected, run by the parity gate with at most `max_tokens` tokens an answer."""

    sha256: str  # of the canonical JSONL blob (blobs/sha256/...)
    rows: int
    references: int
    source: str  # "training test split" or the file it was read from
    max_tokens: int | None = None


class AdapterManifest(_Record):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: int
    digest: str  # "sha256:<hex>" over the sorted (relpath, file sha256) pairs
    files: dict[str, str]  # relpath -> sha256 hex
    file_sizes: dict[str, int] = Field(default_factory=dict)
    base: str
    base_fingerprint: str
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: list[str]  # expanded leaf names, sorted (e.g. "q_proj")
    dtype: str
    size_bytes: int
    created_at: str = Field(default_factory=utc_now)
    source: str | None = None
    training: dict[str, Any] | None = None
    description: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    contract: dict[str, Any] | None = None
    serving: Serving = "lora"
    serving_reason: str | None = None
    base_mismatch: BaseMismatch | None = None  # set only when pushed with allow_base_mismatch
    golden: GoldenSet | None = None  # the prompts its parity gate runs before it gets an alias's traffic

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def digest_hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @property
    def engine_name(self) -> str:
        return f"{self.name}@{self.digest_hex[:12]}"


class BaseManifest(_Record):
    schema_version: int = SCHEMA_VERSION
    name: str
    fingerprint: str
    architecture: str
    model_type: str | None = None
    hidden_size: int
    intermediate_size: int | None = None
    num_hidden_layers: int
    vocab_size: int
    config_hash: str
    tokenizer_hash: str | None = None
    chat_template_hash: str | None = None
    weights_hash: str | None = None
    path: str | None = None  # where the weights were when registered (not copied)
    files: dict[str, str] | None = None  # relpath -> sha256 when the weights were copied into the store
    linear_shapes: dict[str, tuple[int, int]] = Field(default_factory=dict)  # module -> (out_features, in_features)
    embedding_shapes: dict[str, tuple[int, int]] = Field(default_factory=dict)  # module -> (num, dim)
    created_at: str = Field(default_factory=utc_now)
    merged_from: dict[str, Any] | None = None


class RolloutPolicy(_Record):
    """When a gateway stops a rollout by itself: over the last `window_s` seconds, once the candidate has answered
    `min_requests` requests there, a 5xx share above `max_error_ratio`, a p99 time to first token above
    `max_ttft_ratio` times the current version's, or a share of answers keeping to the contract below
    `min_contract_validity` sets the candidate's weight back to 0 (None: that figure is not judged)."""

    max_error_ratio: float | None = None
    max_ttft_ratio: float | None = None
    min_contract_validity: float | None = None
    window_s: float = 300.0
    min_requests: int = 20

    def describe(self) -> str:
        """`errors <= 2%, p99 TTFT <= 2x, contract >= 99% over 300s (>= 20 requests)`."""
        rules = []
        if self.max_error_ratio is not None:
            rules.append(f"errors <= {self.max_error_ratio:.0%}")
        if self.max_ttft_ratio is not None:
            rules.append(f"p99 TTFT <= {self.max_ttft_ratio:g}x")
        if self.min_contract_validity is not None:
            rules.append(f"contract >= {self.min_contract_validity:.0%}")
        return f"{', '.join(rules)} over {self.window_s:g}s (>= {self.min_requests} requests)"


class ParityGate(_Record):
    """What a candidate must show on its golden prompts before it gets any of the alias's traffic (gateway/parity.py):
    a share of answers agreeing with the references (or, for rows without one, with the current version's answer)
    at most `max_agreement_drop` below the current version's, and at least `min_agreement` when set; and, under a
    contract, at least `min_contract_validity` of its answers keeping to it."""

    min_agreement: float | None = None
    max_agreement_drop: float = 0.05
    min_contract_validity: float = 0.99

    def describe(self) -> str:
        """`agreement >= current - 5 points, contract >= 99%`."""
        rules = [f"agreement >= the current version's - {self.max_agreement_drop * 100:g} points"]
        if self.min_agreement is not None:
            rules.append(f"agreement >= {self.min_agreement:.0%}")
        rules.append(f"contract >= {self.min_contract_validity:.0%}")
        return ", ".join(rules)


class AliasSplit(_Record):
    """A rollout in progress on an alias: `weight` percent of its requests go to `version`, the candidate, watched
    by `policy` when it has one."""

    version: int
    weight: int = Field(ge=1, le=99)
    policy: RolloutPolicy | None = None


class AliasShadow(_Record):
    """Shadow traffic on an alias: a copy of `percent` percent of its requests also goes to `version`, whose answers
    are compared with the caller's and thrown away."""

    version: int
    percent: int = Field(ge=1, le=100)


class AliasMove(_Record):
    action: Literal["promote", "rollback"]
    who: str
    when: str
    from_version: int | None
    to_version: int
    from_split: AliasSplit | None = None  # the rollout the alias had before the move (a rollback restores it)
    to_split: AliasSplit | None = None
    from_shadow: AliasShadow | None = None
    to_shadow: AliasShadow | None = None
    reason: str | None = None  # why a gateway stopped a rollout by itself (its policy, with the figures)


class AliasRecord(_Record):
    """Where an alias points: `version`, and while a rollout is in progress, `split`; `shadow` while a version gets
    a copy of its traffic (older readers ignore both and send everything to `version`, the safe side)."""

    schema_version: int = SCHEMA_VERSION
    name: str
    alias: str
    version: int
    split: AliasSplit | None = None
    shadow: AliasShadow | None = None
    gate: ParityGate | None = None  # the alias's parity thresholds (None: ParityGate's defaults)
    history: list[AliasMove] = Field(default_factory=list)

    def versions(self) -> list[int]:
        """The versions the alias serves now (its version, then the candidate, then the shadow)."""
        return (
            [self.version]
            + ([self.split.version] if self.split else [])
            + ([self.shadow.version] if self.shadow else [])
        )


class Tombstone(_Record):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: int
    removed: Literal[True] = True
    removed_at: str = Field(default_factory=utc_now)
    digest: str
