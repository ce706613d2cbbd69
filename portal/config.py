"""Portal settings: environment variables, the site config file and defaults, each checked for its shape (type,
range) when read. What the site's settings mean (runtimes, engines, exporters, tiers) is checked by portal/site.py,
which builds the site from these settings once at start."""
from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ValidationError
from .lifetimes import parse_idle_timeout

SCHEDULER_KINDS = ("slurm", "local")
DEFAULT_SITE_CONFIG = Path("/etc/pilotfish/site.yml")
PRIVATE_UMASK = 0o077  # every file the portal (and what it starts) creates is its user's alone
MAX_REQUEST_BODY = 1024 * 1024  # pages, login and the REST API: JSON and forms, never uploads


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the setting and the problem."""


@dataclass
class Config:
    home: Path
    database_url: str
    scheduler: str = "slurm"
    poll_interval: float = 5.0
    fast_poll_interval: float = 1.0
    site_config_path: Optional[Path] = None
    token: Optional[str] = None
    # From the site config file (admins).
    cache_dir: Optional[Path] = None  # site-wide, read-only for users: models/, images/, resource_specs.yaml
    home_dir: Optional[Path] = None  # the user's own models/ and images/ (default: PILOTFISH_HOME)
    resource_specs: Optional[Path] = None  # default: cache_dir/resource_specs.yaml
    # Read as written; their meaning is portal/site.py's (a bad entry stops the portal at start there).
    runtimes: dict = field(default_factory=dict)  # engine or service kind -> how its server runs
    engines: dict = field(default_factory=dict)  # model format -> engine name
    exporters: dict = field(default_factory=dict)  # exporter name -> what service jobs start for monitoring
    # Folders whose files engine flags may name (--chat-template, ...) besides the model's own (default: cache_dir
    # and home_dir).
    allowed_paths: list = field(default_factory=list)
    # Host names whose image URLs vLLM services may fetch (exact names, redirects not followed); by default none:
    # the nodes are offline and a fetch is a way out, so images come as base64 data URLs.
    media_domains: list = field(default_factory=list)
    scheduler_timeout: float = 30.0
    health_timeout: float = 3.0
    health_concurrency: int = 16
    unhealthy_after: int = 3
    proxy_connect_timeout: float = 5.0
    proxy_read_timeout: float = 600.0  # seconds to wait for an answer's first byte (long generations)
    url_prefix: str = ""  # e.g. /node/<host>/<port> behind Open OnDemand
    max_upload_mb: float = 100.0  # a proxied request's body (/services/..., /v1/...): audio, batch files
    spool_limit_mb: float = 1024.0  # what one worker's gateway uploads may hold at once in PILOTFISH_HOME/spool
    client_read_timeout: float = 30.0  # seconds for a request's head, and a page's or API call's body, to arrive
    job_deadline: Optional[float] = None  # epoch seconds the portal's own job ends: child jobs must end by then
    # Login sessions (portal/sessions.py): they end after this long unused, this long after the login at the latest,
    # and by session_end (epoch seconds: the Open OnDemand job's end) if set.
    session_idle: float = 8 * 3600.0
    session_max: float = 7 * 86400.0
    session_end: Optional[float] = None
    # The default idle timeout of services (minutes; 0: never; None: no default), under the tiers' own
    # (portal/lifetimes.py). An Open OnDemand session sets it from its form (PILOTFISH_IDLE_TIMEOUT).
    idle_timeout: Optional[int] = None
    # A renewed service's job that a successor replaced finishes its open requests for up to this long (seconds).
    drain_timeout: float = 120.0
    # Replicas (portal/replicas.py): one is added after requests in flight per job stayed above the service's target
    # this long (seconds), and one removed after this long quiet.
    scale_up_window: float = 30.0
    scale_down_window: float = 300.0
    # Partitions whose jobs may be preempted: submitted with --requeue, followed back from the queue (portal/states.py).
    preemptible_partitions: list = field(default_factory=list)
    # Batches (portal/batches/): the largest input file (MB), lines per shard (one array task each), attempts in a row
    # without a new answer before a shard's remaining lines go to the error file, and where files and batches live
    # (default: PILOTFISH_HOME).
    batch_max_file_mb: float = 200.0
    batch_shard_size: int = 10000
    batch_max_attempts: int = 3
    batch_scratch_dir: Optional[Path] = None
    # Folders under which a named key's audio batches may name files and folders by path (the owner: anywhere the
    # portal's user can read); none by default: a named key names only the files it uploaded.
    key_audio_folders: list = field(default_factory=list)
    testing: bool = False

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def token_file(self) -> Path:
        return self.home / "token"

    @property
    def reconciler_lock(self) -> Path:
        return self.home / "reconciler.lock"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def files_dir(self) -> Path:
        """Uploaded and produced files of the Files API (0600 each)."""
        return (self.batch_scratch_dir or self.home) / "files"

    @property
    def batches_dir(self) -> Path:
        """One folder per batch: its shards, their answers, its job script and its tasks' logs."""
        return (self.batch_scratch_dir or self.home) / "batches"


def _read_site_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"site config {path}: file not found (set by PILOTFISH_SITE_CONFIG)")
    except OSError as exc:
        raise ConfigError(f"site config {path}: cannot read: {exc.strerror}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"site config {path}: not valid YAML: {exc}")
    if not isinstance(data, dict):
        raise ConfigError(f"site config {path}: expected a mapping at the top level")
    return data


def _number(name: str, value: Any, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value!r}")
    return number


def _idle_timeout(value: Any) -> Optional[int]:
    """Minutes of the site's default idle timeout, as a launch writes it (30, "30m", "1h", 0 or "off"); None unset."""
    if value in (None, ""):
        return None
    try:
        return parse_idle_timeout(value if isinstance(value, int) else str(value).strip())
    except ValidationError as exc:
        raise ConfigError(exc.message) from None


def _prefix(value: Any) -> str:
    text = str(value or "").strip().rstrip("/")
    if text and (not text.startswith("/") or any(c in text for c in "?#\\ ")):
        raise ConfigError(f"url_prefix: expected a path such as /node/host/8080, got {value!r}")
    return text


def load_config(overrides: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Build the configuration from, in increasing priority: defaults, site config file, environment, overrides."""
    env = os.environ if environ is None else environ
    overrides = dict(overrides or {})

    home = Path(overrides.pop("home", None) or env.get("PILOTFISH_HOME") or Path.home() / ".pilotfish").expanduser()
    site_path = overrides.pop("site_config_path", None) or env.get("PILOTFISH_SITE_CONFIG")
    if not site_path and DEFAULT_SITE_CONFIG.is_file():  # where admins put it (the OOD form looks there too)
        site_path = DEFAULT_SITE_CONFIG
    site: dict = {}
    if site_path:
        site_path = Path(site_path).expanduser()
        site = _read_site_config(site_path)

    def pick(key: str, env_name: Optional[str], default: Any) -> Any:
        if key in overrides:
            return overrides.pop(key)
        if env_name and env.get(env_name):
            return env[env_name]
        return site.get(key, default)

    database_url = pick("database_url", "PILOTFISH_DATABASE_URL", None) or f"sqlite:///{home / 'pilotfish.db'}"
    scheduler = str(pick("scheduler", "PILOTFISH_SCHEDULER", "slurm"))
    if scheduler not in SCHEDULER_KINDS:
        raise ConfigError(f"scheduler: expected one of {', '.join(SCHEDULER_KINDS)}, got {scheduler!r}")
    poll = _number("poll_interval", pick("poll_interval", "PILOTFISH_POLL_INTERVAL", 5.0), 0.1)
    fast_poll = _number("fast_poll_interval", pick("fast_poll_interval", None, min(1.0, poll)), 0.1)
    cache_dir = pick("cache_dir", "PILOTFISH_CACHE_DIR", None)
    runtimes = pick("runtimes", None, {}) or {}
    if not isinstance(runtimes, dict):
        raise ConfigError("runtimes: expected a mapping of service kind to runtime")
    engines = pick("engines", None, {}) or {}
    if not isinstance(engines, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in engines.items()):
        raise ConfigError("engines: expected a mapping of model format to engine, e.g. {gguf: llama-cpp}")
    exporters = pick("exporters", None, {})
    exporters = {} if exporters in (None, "") else exporters
    if not isinstance(exporters, dict):
        raise ConfigError("exporters: expected a mapping of exporter name to {command: ...}")
    home_dir = pick("home_dir", "PILOTFISH_HOME_DIR", None)
    allowed_paths = pick("allowed_paths", None, None)
    if allowed_paths is not None and (not isinstance(allowed_paths, list) or not all(
            isinstance(entry, str) and entry.strip() for entry in allowed_paths)):
        raise ConfigError("allowed_paths: expected a list of folders such as [/shared/templates]")
    media_domains = pick("media_domains", None, None) or []
    if not isinstance(media_domains, list) or not all(isinstance(entry, str) and re.fullmatch(
            r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}\.)*[A-Za-z0-9\-]{1,63}", entry) for entry in media_domains):
        raise ConfigError("media_domains: expected a list of host names such as [images.example.org]")
    specs = pick("resource_specs", "PILOTFISH_RESOURCE_SPECS", None)
    preemptible = pick("preemptible_partitions", None, None) or []
    if not isinstance(preemptible, list) or not all(isinstance(entry, str) and re.fullmatch(
            r"[A-Za-z0-9_.\-]{1,100}", entry) for entry in preemptible):
        raise ConfigError("preemptible_partitions: expected a list of partition names such as [preempt, spot]")
    deadline = pick("job_deadline", "PILOTFISH_JOB_DEADLINE", None)
    scratch = pick("batch_scratch_dir", "PILOTFISH_BATCH_SCRATCH_DIR", None)
    key_audio = pick("key_audio_folders", None, None) or []
    if not isinstance(key_audio, list) or not all(isinstance(entry, str) and entry.strip() for entry in key_audio):
        raise ConfigError("key_audio_folders: expected a list of folders such as [/shared/recordings]")
    session_end = pick("session_end", "PILOTFISH_SESSION_END", None)

    config = Config(
        home=home,
        database_url=database_url,
        scheduler=scheduler,
        poll_interval=poll,
        fast_poll_interval=fast_poll,
        site_config_path=Path(site_path) if site_path else None,
        token=pick("token", "PILOTFISH_TOKEN", None),
        cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
        home_dir=Path(home_dir).expanduser() if home_dir else home,
        resource_specs=Path(specs).expanduser() if specs else None,
        runtimes=runtimes,
        engines=engines,
        exporters=exporters,
        allowed_paths=[Path(entry).expanduser() for entry in allowed_paths] if allowed_paths is not None else
        [path for path in (Path(cache_dir).expanduser() if cache_dir else None,
                           Path(home_dir).expanduser() if home_dir else home) if path is not None],
        media_domains=[entry.lower() for entry in media_domains],
        scheduler_timeout=_number("scheduler_timeout", pick("scheduler_timeout", None, 30.0), 1),
        health_timeout=_number("health_timeout", pick("health_timeout", None, 3.0), 0.1),
        health_concurrency=int(_number("health_concurrency", pick("health_concurrency", None, 16), 1)),
        unhealthy_after=int(_number("unhealthy_after", pick("unhealthy_after", None, 3), 1)),
        proxy_connect_timeout=_number("proxy_connect_timeout", pick("proxy_connect_timeout", None, 5.0), 0.1),
        proxy_read_timeout=_number("proxy_read_timeout", pick("proxy_read_timeout", None, 600.0), 0.1),
        url_prefix=_prefix(pick("url_prefix", "PILOTFISH_URL_PREFIX", "")),
        max_upload_mb=_number("max_upload_mb", pick("max_upload_mb", "PILOTFISH_MAX_UPLOAD_MB", 100.0), 0.001),
        spool_limit_mb=_number("spool_limit_mb", pick("spool_limit_mb", None, 1024.0), 1),
        client_read_timeout=_number("client_read_timeout", pick("client_read_timeout", None, 30.0), 1),
        job_deadline=_number("job_deadline", deadline, 0) if deadline not in (None, "") else None,
        session_idle=_number("session_idle", pick("session_idle", "PILOTFISH_SESSION_IDLE", 8 * 3600.0), 1),
        session_max=_number("session_max", pick("session_max", "PILOTFISH_SESSION_MAX", 7 * 86400.0), 60),
        session_end=_number("session_end", session_end, 0) if session_end not in (None, "") else None,
        idle_timeout=_idle_timeout(pick("idle_timeout", "PILOTFISH_IDLE_TIMEOUT", None)),
        drain_timeout=_number("drain_timeout", pick("drain_timeout", "PILOTFISH_DRAIN_TIMEOUT", 120.0), 0),
        scale_up_window=_number("scale_up_window", pick("scale_up_window", None, 30.0), 0),
        scale_down_window=_number("scale_down_window", pick("scale_down_window", None, 300.0), 0),
        preemptible_partitions=list(preemptible),
        batch_max_file_mb=_number("batch_max_file_mb", pick("batch_max_file_mb", None, 200.0), 0.001),
        batch_shard_size=int(_number("batch_shard_size", pick("batch_shard_size", None, 10000), 1)),
        batch_max_attempts=int(_number("batch_max_attempts", pick("batch_max_attempts", None, 3), 1)),
        batch_scratch_dir=Path(scratch).expanduser() if scratch else None,
        key_audio_folders=[Path(entry).expanduser() for entry in key_audio],
        testing=bool(overrides.pop("testing", False)),
    )
    if overrides:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(overrides))}")
    return config


def use_private_umask() -> None:
    """From now on this process and its children create files for their user alone (0600, folders 0700)."""
    os.umask(PRIVATE_UMASK)


def prepare_home(config: Config) -> None:
    """Create PILOTFISH_HOME (private to the user), its jobs folder and the upload spool (0700)."""
    try:
        config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        config.jobs_dir.mkdir(exist_ok=True, mode=0o700)
        config.spool_dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(config.spool_dir, 0o700)
    except OSError as exc:
        raise ConfigError(f"PILOTFISH_HOME {config.home}: cannot create: {exc.strerror}")


def ensure_token(config: Config) -> str:
    """The portal token: from the config, else read from (or generated into) a 0600 file in PILOTFISH_HOME."""
    if config.token:
        return config.token
    path = config.token_file
    for _ in range(50):
        try:
            token = path.read_text().strip()
            if token:
                return token
        except FileNotFoundError:
            token = secrets.token_urlsafe(32)
            tmp = path.with_name(f".token.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token + "\n")
            try:
                os.link(tmp, path)  # atomic and exclusive: concurrent workers agree on one token
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            continue
        time.sleep(0.05)
    raise ConfigError(f"token file {path} is empty: delete it to generate a new token")
