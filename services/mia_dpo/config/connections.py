"""Connection sections: where data and tasks live, and how workers start.

`store` (local directory or S3/MinIO), `queue` (in-process or Redis) and `launcher`
(with its `kubernetes` subsection), plus the environment variables that override
them. Connection settings may come from the environment; credentials may ONLY
come from the environment (or a Kubernetes Secret mounted as environment), so a
config file or a stored copy of it never holds one. No output depends on these
sections: `RunConfig.stage_params()` leaves them out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from mia_dpo.config.base import Section
from mia_dpo.errors import UserError
from mia_dpo.records import STAGE_ORDER

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StoreConfig(Section):
    backend: Literal["local", "s3"] = Field(
        default="local", description="local directory or S3/MinIO bucket."
    )
    root: str = Field(default="./mia-dpo-data", description="Local backend: root directory.")
    endpoint: str = Field(
        default="localhost:9000",
        description="S3 backend: host:port of the S3/MinIO endpoint (env MIA_DPO_S3_ENDPOINT).",
    )
    bucket: str = Field(
        default="mia-dpo", description="S3 backend: bucket (env MIA_DPO_S3_BUCKET)."
    )
    prefix: str = Field(default="", description="S3 backend: key prefix inside the bucket.")
    secure: bool = Field(default=False, description="S3 backend: use TLS (env MIA_DPO_S3_SECURE).")
    region: str | None = Field(
        default=None, description="S3 backend: region (env MIA_DPO_S3_REGION)."
    )
    create_bucket: bool = Field(
        default=True, description="S3 backend: create the bucket if missing."
    )
    retry_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Keep retrying transient S3 errors (connection refused, 5xx) this long (s).",
    )
    # Credentials: environment only (MIA_DPO_S3_ACCESS_KEY / MIA_DPO_S3_SECRET_KEY).
    access_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    secret_key: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        # S3's naming rules, checked here so a typo is one line, not a client traceback.
        if not _BUCKET.fullmatch(v) or ".." in v:
            raise ValueError(
                f"{v!r} is not an S3 bucket name (3-63 characters: lowercase letters, "
                "digits, '.' and '-', starting and ending with a letter or digit)"
            )
        return v


class QueueConfig(Section):
    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: in-process, one controller process; redis: shared by processes.",
    )
    url: str = Field(
        default="redis://localhost:6379/0",
        description="Redis URL without a password (env MIA_DPO_REDIS_URL).",
    )
    namespace: str = Field(default="mia-dpo", description="Prefix of every Redis key.")
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A claimed task not renewed for this long is reclaimed by another worker (s).",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Deliveries of a task before it is dead-lettered."
    )
    poll_seconds: float = Field(
        default=0.5, gt=0, description="Longest wait between claim attempts on an idle queue (s)."
    )
    password: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _no_password_in_url(self) -> QueueConfig:
        if urlsplit(self.url).password:
            raise ValueError(
                "url must not carry credentials; set MIA_DPO_REDIS_PASSWORD (or MIA_DPO_REDIS_URL)"
            )
        return self


class KubernetesLauncherConfig(Section):
    namespace: str | None = Field(
        default=None,
        description=(
            "Namespace of the stage Jobs; null: the controller pod's own namespace "
            "(its service-account token folder), else 'default'."
        ),
    )
    job_templates: str = Field(
        default="/etc/mia-dpo/jobs",
        description=(
            "Folder holding one batch/v1 Job manifest per stage, `<stage>.yaml` (the Helm "
            "chart mounts them from its ConfigMap)."
        ),
    )
    cleanup: Literal["on_success", "always", "never"] = Field(
        default="on_success",
        description=(
            "Delete a stage's Job (and its pods) when the stage ends: only if it succeeded "
            "(failed ones stay for `kubectl logs`), always, or never."
        ),
    )
    poll_seconds: float = Field(
        default=2.0, gt=0, description="Seconds between reads of a stage Job's status."
    )
    drain_seconds: float = Field(
        default=300.0,
        gt=0,
        description="After a stage closes, how long to wait for its Job to finish (s).",
    )
    api_retry_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Keep polling through API server outages (5xx, refused) this long (s).",
    )


class LauncherConfig(Section):
    kind: Literal["inline", "local", "external", "kubernetes"] = Field(
        default="inline",
        description=(
            "inline: worker threads inside the controller (embedded default); local: worker "
            "subprocesses; external: workers started by someone else (Compose); kubernetes: "
            "one Job per stage, created from a template by the controller."
        ),
    )
    kubernetes: KubernetesLauncherConfig = Field(
        default_factory=KubernetesLauncherConfig,
        description="kubernetes launcher: where the stage Job templates are and what to clean.",
    )
    workers: dict[str, int] = Field(
        default_factory=dict, description="Workers per stage, e.g. {augment: 4}; default 1."
    )
    default_workers: int = Field(
        default=1, ge=1, le=1024, description="Workers for unlisted stages."
    )
    max_restarts: int = Field(
        default=10, ge=0, description="local: restarts of crashed worker processes per stage."
    )
    failure_budget: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of a stage's shards that may be dead-lettered and the run go on.",
    )

    def workers_for(self, stage: str) -> int:
        return self.workers.get(stage, self.default_workers)

    @model_validator(mode="after")
    def _known_stages(self) -> LauncherConfig:
        for stage, n in self.workers.items():
            if stage not in STAGE_ORDER:
                raise ValueError(
                    f"workers: unknown stage {stage!r} (known: {', '.join(STAGE_ORDER)})"
                )
            if n < 1:
                raise ValueError(f"workers.{stage}: must be >= 1, got {n}")
        return self


# Environment variable -> (section, field). Applied after the file, so the
# environment always wins; credentials have no file field to lose to.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "MIA_DPO_REDIS_URL": ("queue", "url"),
    "MIA_DPO_REDIS_PASSWORD": ("queue", "password"),
    "MIA_DPO_S3_ENDPOINT": ("store", "endpoint"),
    "MIA_DPO_S3_BUCKET": ("store", "bucket"),
    "MIA_DPO_S3_PREFIX": ("store", "prefix"),
    "MIA_DPO_S3_SECURE": ("store", "secure"),
    "MIA_DPO_S3_REGION": ("store", "region"),
    "MIA_DPO_S3_ACCESS_KEY": ("store", "access_key"),
    "MIA_DPO_S3_SECRET_KEY": ("store", "secret_key"),
}
SECRET_FIELDS = {("queue", "password"), ("store", "access_key"), ("store", "secret_key")}


def _redis_url_from_env(raw: str, section: dict[str, Any]) -> None:
    """A Redis URL from the environment may carry a password: split it out (the
    user name, an ACL user, stays in the URL)."""
    parts = urlsplit(raw)
    if parts.password:
        section["password"] = unquote(parts.password)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        raw = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    section["url"] = raw


def reject_file_credentials(raw: dict[str, Any], source: str) -> None:
    """Refuse a credential field in a config file: it is read from the environment only."""
    for section, field in SECRET_FIELDS:
        if isinstance(raw.get(section), dict) and field in raw[section]:
            raise UserError(
                f"{source}: {section}.{field}: credentials are read only from the environment "
                f"({env_name(section, field)}), never from a config file"
            )


def apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Write the set (non-empty) ENV_OVERRIDES variables into the raw config, in place."""
    for var, (section, field) in ENV_OVERRIDES.items():
        if environ.get(var) not in (None, ""):
            sec = raw.setdefault(section, {})
            if not isinstance(sec, dict):
                continue  # the validator reports the malformed section
            if var == "MIA_DPO_REDIS_URL":
                _redis_url_from_env(environ[var], sec)
            else:
                sec[field] = environ[var]


def env_name(section: str, field: str) -> str:
    """The environment variable that sets `section.field`."""
    return next(k for k, v in ENV_OVERRIDES.items() if v == (section, field))
