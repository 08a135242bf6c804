"""The one settings object of ctdx.

Every setting is read from an environment variable ``CTDX_<NAME>`` (and, if
``CTDX_CONFIG_FILE`` names one, from a TOML file whose keys are the lower-case
names without the prefix; environment variables win). Each field's
``description`` is the documentation: ``tests/test_settings_doc.py`` keeps the
README's configuration table complete against this class.

Settings are frozen. Entry points build one with :func:`load_settings`
(optionally overriding fields from CLI flags) and pass it down explicitly.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CTDX_"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Typed, frozen configuration; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", populate_by_name=True
    )

    # --- identity and network -------------------------------------------------
    ae_title: str = Field(
        "CTDX", min_length=1, max_length=16, description="AE title of the DICOM listener."
    )
    host: str = Field("0.0.0.0", description="Address the DICOM listener binds to.")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the DICOM listener.")
    allowed_calling_aes: Annotated[tuple[str, ...], NoDecode] = Field(
        ("*",),
        description=(
            "Comma-separated calling AE titles allowed to associate; `*` allows any. "
            "Others are rejected at association (A-ASSOCIATE-RJ, calling AE not recognised)."
        ),
    )
    max_associations: int = Field(
        16, ge=1, description="Maximum simultaneous associations per listener process."
    )
    max_pending_associations: int = Field(
        32,
        ge=1,
        description=(
            "Connections per listener process still sending their A-ASSOCIATE-RQ (each ends "
            "within the ACSE time-out); they do not count against CTDX_MAX_ASSOCIATIONS. "
            "More are closed at once."
        ),
    )
    max_pending_per_peer: int = Field(
        8,
        ge=1,
        description=(
            "Of CTDX_MAX_PENDING_ASSOCIATIONS, how many may come from one peer address; "
            "more are closed at once."
        ),
    )
    listener_processes: int = Field(
        1,
        ge=1,
        description=(
            "Listener processes sharing the port (SO_REUSEPORT); more than 1 uses more cores."
        ),
    )
    max_pdu: int = Field(
        262_144,
        ge=0,
        description="Maximum PDU size the listener offers (bytes; 0 = unlimited).",
    )
    fast_receive: bool = Field(
        True,
        description=(
            "Receive C-STORE data sets on the listener's fast path (scp/fastpath.py); "
            "false hands every PDU to pynetdicom."
        ),
    )
    network_timeout: float = Field(
        60.0, gt=0, description="Seconds an idle association is kept before it is aborted."
    )
    tls_cert: Path | None = Field(
        None, description="PEM server certificate; with CTDX_TLS_KEY enables TLS on the listener."
    )
    tls_key: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate signed by it.",
    )

    # --- storage ----------------------------------------------------------------
    data_dir: Path = Field(
        Path("ctdx-data"),
        description=(
            "Spool (received instances, reports) and the default SQLite database live here."
        ),
    )
    database_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the results database; default `sqlite:///<data_dir>/ctdx.sqlite3`. "
            "Production: `postgresql+psycopg://user@host/db`."
        ),
    )
    min_free_bytes: int = Field(
        1_000_000_000,
        ge=0,
        description="Free disk space under the data dir below which C-STORE answers 0xA700.",
    )
    retention_days: float = Field(
        7.0,
        ge=0,
        description=(
            "Source instances of finished study versions (analysed or failed, every report "
            "delivered or dead) are deleted from the spool this many days after they arrived; "
            "results, audit rows and ctdx's report objects stay (`ctdx spool prune`)."
        ),
    )
    report_retention_days: float | None = Field(
        None,
        ge=0,
        description=(
            "Report objects ctdx wrote (SR, SC, KO under the data dir) are deleted this many "
            "days after they were made once every export of them is delivered (a dead one is "
            "kept for `ctdx exports retry`); unset = kept."
        ),
    )
    emergency_free_bytes: int = Field(
        5_000_000_000,
        ge=0,
        description=(
            "High-water mark above CTDX_MIN_FREE_BYTES: below this much free space the oldest "
            "finished studies are pruned before their retention is over (never one not yet "
            "analysed or whose report is not yet delivered); 0 turns this off."
        ),
    )
    prune_interval_seconds: float = Field(
        300.0,
        ge=0,
        description=(
            "How often `ctdx worker`'s main process prunes the spool (retention and emergency "
            "cleaning); 0 turns it off (then run `ctdx spool prune` from cron)."
        ),
    )

    # --- study completion and queueing ----------------------------------------
    quiet_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "A study is complete after this many seconds with no new instance and no "
            "open association sending it."
        ),
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "Celery broker URL (Redis in production; `memory://` or `embedded` for the "
            "no-service mode)."
        ),
    )
    outbox_poll_seconds: float = Field(
        1.0,
        gt=0,
        description="How often the listener retries handing queued studies to the broker.",
    )

    # --- analysis -----------------------------------------------------------------
    model: Path | None = Field(
        None,
        description=(
            "Path of the recognition checkpoint (ResNet50, written by `ctdx train export`)."
        ),
    )
    manifestation_model: Path | None = Field(
        None,
        description=(
            "Path of the manifestation checkpoint (ResNet18); none = manifestations not reported."
        ),
    )
    covid_threshold: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Study is COVID-19 when the share of analysed slices called COVID-19 is "
            "above this (paper: 5%)."
        ),
    )
    min_lung_fraction: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Slices whose lung mask covers less than this share of the image are skipped.",
    )
    batch_size: int = Field(
        32, ge=1, description="Slices per batch through segmentation and the networks."
    )
    device: str = Field("auto", description="`auto` (GPU when present), `cpu` or `cuda[:N]`.")
    precision: Literal["auto", "fp32", "bf16", "int8", "ort-int8"] = Field(
        "auto",
        description=(
            "Network precision: `auto` = bf16 on a GPU; on a CPU the checkpoint's checked int8 "
            "weights when it has them, else bf16 where native and faster, else fp32. With both "
            "PyTorch and ONNX Runtime int8 in the checkpoint, `auto` serves the one faster on "
            "this host (timed at worker start, cached in `<data_dir>/cpu-runtime.json`); "
            "`int8` / `ort-int8` force PyTorch's / ONNX Runtime's."
        ),
    )
    task_time_limit: int = Field(
        1800, ge=10, description="Hard time limit of one study analysis (seconds)."
    )
    segmentation_backend: Literal["torch", "skimage"] = Field(
        "torch",
        description=(
            "Lung segmentation used by the worker: `torch` (batched, the default) or `skimage` "
            "(the paper's scikit-image reference, slice by slice)."
        ),
    )
    series_rules: Path | None = Field(
        None,
        description=(
            "TOML or JSON file of series-selection rules (filters and preferences); "
            "unset = the built-in rules of `worker/series_selection.py`."
        ),
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description=(
            "Torch intra-op threads per worker process; 0 = the cores divided by the worker's "
            "concurrency. 1 is faster on a CPU shared with other busy processes."
        ),
    )
    claim_timeout: float = Field(
        300.0,
        ge=5,
        description=(
            "Seconds without a heartbeat after which a worker's claim on a study is taken to be "
            "abandoned (worker killed) and another worker takes the study over."
        ),
    )
    queued_timeout: float = Field(
        600.0,
        ge=5,
        description=(
            "Seconds a study may wait queued without a worker claiming it before the listener "
            "or a worker publishes it to the broker again (the broker lost the message); "
            "stale claims are published again after CTDX_CLAIM_TIMEOUT."
        ),
    )
    outbox_alert_seconds: float = Field(
        300.0,
        gt=0,
        description=(
            "A study waiting this long in the outbox (broker unreachable) is logged once as a "
            "warning by the listener and makes `ctdx status` report degraded."
        ),
    )
    metrics_port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="Port of the listener's Prometheus metrics (HTTP /metrics); 0 turns it off.",
    )
    worker_metrics_port: int = Field(
        9109,
        ge=0,
        le=65535,
        description="Port of each worker's Prometheus metrics (HTTP /metrics); 0 turns it off.",
    )

    # --- reporting ----------------------------------------------------------------
    pacs_ae_title: str = Field(
        "PACS", max_length=16, description="AE title of the PACS that receives reports."
    )
    pacs_host: str | None = Field(
        None, description="Host of the PACS; unset = reports are built but not sent."
    )
    pacs_port: int = Field(104, ge=1, le=65535, description="Port of the PACS.")
    report_outputs: Annotated[tuple[Literal["sr", "sc", "ko"], ...], NoDecode] = Field(
        ("sr", "sc"),
        min_length=1,
        description=(
            "Comma-separated objects sent to the PACS per analysed study: `sr` (DICOM SR), "
            "`sc` (Secondary Capture summary image: the result as a picture, which every image "
            "viewer shows; OHIF does not display the SR's content, see docs/viewers.md), "
            "`ko` (Key Object Selection of the key slices); e.g. `sr,sc,ko`."
        ),
    )
    export_max_attempts: int = Field(
        12,
        ge=1,
        description="C-STORE attempts per report object before it is dead-lettered (state `dead`).",
    )
    export_backoff_seconds: float = Field(
        30.0,
        gt=0,
        description="Delay after the first failed C-STORE; doubles after each further failure.",
    )
    export_backoff_max_seconds: float = Field(
        3600.0,
        gt=0,
        description=(
            "Upper bound of the retry delay; with the defaults 12 attempts span about 5 hours."
        ),
    )

    # --- alerts (docs/alerts.md) --------------------------------------------------
    alert_webhook_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description=(
            "Comma-separated URLs that receive alerts as signed JSON POSTs (schema: "
            "docs/alerts.md); unset = no alerts."
        ),
    )
    alert_events: Annotated[tuple[str, ...], NoDecode] = Field(
        ("study.covid19", "study.failed", "export.dead", "status.changed"),
        description=(
            "Comma-separated events that are alerted: `study.covid19`, `study.failed`, "
            "`export.dead`, `status.changed` (self-test studies never alert)."
        ),
    )
    alert_secret: str | None = Field(
        None,
        description=(
            "HMAC-SHA256 key; when set, each alert carries `X-Ctdx-Signature: sha256=<hex>` "
            "of its body."
        ),
    )
    alert_include_phi: bool = Field(
        False,
        description="Add patient name and ID to alert payloads (default: UIDs and accession only).",
    )
    alert_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Time-out of one alert POST (connect and response)."
    )
    alert_max_attempts: int = Field(
        10, ge=1, description="POST attempts per alert and URL before it is dead-lettered."
    )
    alert_backoff_seconds: float = Field(
        15.0,
        gt=0,
        description="Delay after the first failed alert POST; doubles after each, at most 1 hour.",
    )

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _parse_aes(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("alert_webhook_urls", "alert_events", mode="before")
    @classmethod
    def _parse_alerts(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("report_outputs", mode="before")
    @classmethod
    def _parse_outputs(cls, value: Any) -> Any:
        return _split_csv(value.lower()) if isinstance(value, str) else value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ctdx.sqlite3').absolute()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def calling_ae_allow_list(self) -> tuple[str, ...] | None:
        """The calling AE titles allowed to associate; ``None`` when any is (``*``)."""
        return None if "*" in self.allowed_calling_aes else self.allowed_calling_aes

    def allows_calling_ae(self, ae_title: str) -> bool:
        allowed = self.calling_ae_allow_list
        return allowed is None or ae_title.strip() in allowed


def _file_values(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    return {key.lower(): value for key, value in raw.items()}


def load_settings(**overrides: Any) -> Settings:
    """Build settings from file, environment and explicit overrides (highest wins).

    ``overrides`` whose value is ``None`` are ignored, so CLI options can be
    passed straight through.
    """
    values: dict[str, Any] = {}
    config_file = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    if config_file:
        file_values = _file_values(Path(config_file))
        env_names = {k[len(ENV_PREFIX) :].lower() for k in os.environ if k.startswith(ENV_PREFIX)}
        values.update({k: v for k, v in file_values.items() if k not in env_names})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def markdown_table() -> str:
    """The README's configuration rows (``python -m db.settings`` prints them)."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, tuple):
            shown = f"`{','.join(default)}`"
        elif default is None:
            shown = "unset"
        else:
            shown = f"`{default}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
