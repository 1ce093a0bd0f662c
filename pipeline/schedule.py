"""Recurring runs on a Kubeflow Pipelines endpoint: scheduled retraining as new facts arrive.

``create_recurring_run`` validates its arguments before anything is contacted: the cron expression
(Kubeflow's form has six fields, seconds first; a five-field expression gets ``0`` seconds), the
endpoint URL, the settings (params.yaml); then checks that the endpoint answers at all, compiles
the pipeline and creates the recurring run in the named experiment (created when missing).
"""

from __future__ import annotations

import re
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from meg.errors import ConfigError, MegError

# (name, low, high, names) of the six fields of a Kubeflow cron expression
_FIELDS = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")


class EndpointError(MegError):
    """The Kubeflow Pipelines endpoint cannot be reached."""


def _value(text: str, low: int, high: int, names: tuple[str, ...], field: str, expr: str) -> int:
    upper = text.upper()
    if upper in names:
        return names.index(upper) + (low if low == 1 else 0)
    if not text.isdigit():
        raise ConfigError(f"cron {expr!r}: {field} field: {text!r} is not a number"
                          + (f" or one of {', '.join(names)}" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise ConfigError(f"cron {expr!r}: {field} field: {value} is outside {low}-{high}")
    return value


def _check_field(part: str, field: str, low: int, high: int, names: tuple[str, ...], expr: str) -> None:
    for item in part.split(","):
        if not item:
            raise ConfigError(f"cron {expr!r}: {field} field: empty list item")
        base, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ConfigError(f"cron {expr!r}: {field} field: bad step {step!r}")
        if base in ("*", "?"):
            if base == "?" and field not in ("day of month", "day of week"):
                raise ConfigError(f"cron {expr!r}: '?' is allowed only in the day fields")
            continue
        start, dash, end = base.partition("-")
        a = _value(start, low, high, names, field, expr)
        if dash:
            b = _value(end, low, high, names, field, expr)
            if b < a:
                raise ConfigError(f"cron {expr!r}: {field} field: range {base!r} runs backwards")


def validate_cron(expr: str) -> str:
    """A valid Kubeflow cron expression (six fields, seconds first, or a macro), else ConfigError."""
    text = " ".join(str(expr).split())
    if text.startswith("@"):
        if text in _MACROS or _EVERY.match(text):
            return text
        raise ConfigError(f"cron {expr!r}: unknown macro (use {', '.join(_MACROS)} or '@every 1h30m')")
    parts = text.split(" ")
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise ConfigError(f"cron {expr!r}: expected 5 fields (minute hour day month weekday) or 6 (seconds first), "
                          f"got {len(parts)}")
    for part, (field, low, high, names) in zip(parts, _FIELDS):
        _check_field(part, field, low, high, names, text)
    return " ".join(parts)


def validate_host(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"host {url!r}: expected an http(s) URL of the Kubeflow Pipelines API, "
                          "e.g. https://kubeflow.example.com/pipeline")
    try:
        parsed.port
    except ValueError as e:
        raise ConfigError(f"host {url!r}: {e}") from None
    return url.rstrip("/")


def check_reachable(url: str, timeout: float = 5.0) -> None:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise EndpointError(f"cannot reach the Kubeflow Pipelines endpoint {url} "
                            f"({parsed.hostname}:{port}: {e.strerror or e}); is the URL right and the cluster up?") from e


def create_recurring_run(host: str, cron: str, experiment: str, name: str = "meg-retrain",
                         params_path: str | Path = "params.yaml", shards: int = 4, tracking_uri: str = "",
                         data_dir: str = "", cache_dir: str = "", client_factory=None) -> str:
    """Create a recurring run of the pipeline; returns a one-line description of it."""
    from meg import config

    cron6 = validate_cron(cron)
    host = validate_host(host)
    if not experiment or not experiment.strip():
        raise ConfigError("experiment: a name is required")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,62}[a-z0-9])?", name):
        raise ConfigError(f"name {name!r}: lowercase letters, digits and '-', at most 64 characters")
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards {shards!r}: an integer >= 1")
    text = Path(params_path).read_text() if Path(params_path).is_file() else None
    if text is None:
        raise ConfigError(f"{params_path}: no such settings file")
    weights = config.parse_params(text, str(params_path))["generator"]["weights"]
    check_reachable(host)
    from pipeline.compile import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "meg-pipeline.yaml", shards=shards, weights=weights)
        if client_factory is None:
            import kfp

            client_factory = kfp.Client
        client = client_factory(host=host)
        try:
            exp = client.get_experiment(experiment_name=experiment)
        except Exception:  # missing: kfp raises a server-side error type that varies by version
            exp = client.create_experiment(experiment)
        run = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=name, cron_expression=cron6, max_concurrency=1,
            no_catchup=True, pipeline_package_path=str(package),
            params={"params": text, "data_dir": data_dir, "cache_dir": cache_dir, "tracking_uri": tracking_uri,
                    "experiment": experiment},
        )
    return f"recurring run {getattr(run, 'recurring_run_id', run)} '{name}' in experiment '{experiment}': cron {cron6}"
