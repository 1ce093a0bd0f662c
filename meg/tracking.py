"""The only module that talks to MLflow.

Default store: a local SQLite database ``<root>/mlflow.db`` with artifacts under
``<root>/mlartifacts``; ``MLFLOW_TRACKING_URI`` (a tracking server) overrides it, and
``MEG_MLFLOW_ARTIFACTS`` (e.g. ``s3://bucket/mlflow``; MLflow reads ``MLFLOW_S3_ENDPOINT_URL`` and the
usual AWS variables) is where a new experiment keeps its artifacts. ``MEG_TRACKING=off`` turns
tracking off for the pipeline stages.

Pipeline runs: one MLflow run per stage, nested under the pipeline's run, whose id the stage
processes find in ``MEG_PARENT_RUN_ID`` (``meg demo`` and the Kubeflow pipeline set it). The edit
bundle is logged as a pyfunc model (``EditedModelPyfunc``: prompts in, the edited model's answers
out) carrying the bundle directory as its artifact ``bundle``, and registered by ``Registry``.

Uploads to the artifact store (reports, the bundle model) are retried when the failure may pass by
itself (store unreachable, connection dropped, 5xx, throttling, files missing after the upload):
``MEG_STORE_RETRIES`` attempts (default 4) with a wait of ``MEG_STORE_BACKOFF`` seconds (default 5)
before the second, doubling after each failure. This is on top of botocore's retries of each single
request (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``; left at botocore's defaults), which ride out a
blip but not a store that is down for longer than a few seconds. A failure that will not pass (no
bucket, access denied, no credentials) or the last attempt raises StoreError naming the store. A
bundle is registered only from a logged model whose upload finished (status READY) and whose files
the store was seen to hold, each at its size: a half-uploaded bundle is never registered.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

EXPERIMENT = "meg"
_configured: dict[str, str] = {"experiment": EXPERIMENT}


def configure(root: str | Path, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the tracking URI."""
    import mlflow

    root = Path(root).resolve()
    server = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri below exports it
    uri = server or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = os.environ.get("MEG_MLFLOW_ARTIFACTS")
        if not artifacts and uri.startswith("sqlite:///"):
            # beside the database, never relative to whatever directory the process runs in
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)
    _configured["experiment"] = experiment
    return uri


@contextmanager
def run(name: str, params: dict | None = None, nested: bool = False, tags: dict | None = None) -> Iterator[str]:
    """An MLflow run; yields its id."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=nested, tags=tags) as active:
        if params:
            log_params(params)
        yield active.info.run_id


PARENT_ENV = "MEG_PARENT_RUN_ID"
MODEL_ARTIFACT = "bundle"  # the pyfunc model's artifact holding the bundle directory (shared with serving)


def enabled() -> bool:
    """Whether the pipeline stages log to MLflow (``MEG_TRACKING=off`` turns it off)."""
    return os.environ.get("MEG_TRACKING", "on").lower() not in ("off", "0", "false", "no")


# -------------------------------------------------------------------------------- pipeline runs


def start_pipeline_run(name: str = "pipeline", tags: dict | None = None) -> str:
    """Create the parent run of one pipeline execution (left open for the stage processes); its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment = mlflow.get_experiment_by_name(_configured["experiment"])
    run = MlflowClient().create_run(experiment.experiment_id, run_name=name, tags={"meg.kind": "pipeline", **(tags or {})})
    return run.info.run_id


def end_pipeline_run(run_id: str, ok: bool) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def find_pipeline_run(tag: str, value: str) -> str | None:
    """The id of the newest pipeline run of the configured experiment whose ``tag`` is ``value``."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=[_configured["experiment"]],
                              filter_string=f"tags.`meg.kind` = 'pipeline' and tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


@contextmanager
def stage_run(stage: str, params: dict, parent_run_id: str | None = None, tags: dict | None = None) -> Iterator[str]:
    """One stage's run, nested under the pipeline run (``parent_run_id`` or ``$MEG_PARENT_RUN_ID``)."""
    import mlflow

    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags={"meg.stage": stage, **(tags or {})}) as active:
        if params:
            log_params(params)
        yield active.info.run_id


def log_result(result) -> None:
    """Log a ``meg.stages.StageResult`` into the active run: metrics, tags, artifacts, the bundle model."""
    import mlflow

    log_metrics(result.metrics)
    if result.tags:
        mlflow.set_tags(result.tags)
    for path in result.artifacts:
        path = Path(path)
        if path.is_dir():
            with_retries(f"uploading {path}", lambda p=path: mlflow.log_artifacts(str(p), artifact_path=p.name))
        elif path.is_file():
            log_artifact(path, artifact_path=result.stage)
    if result.bundle is not None:
        log_bundle_model(result.bundle)


# -------------------------------------------------------------------------------- the pyfunc model


SHA_TAG = "meg.bundle_sha256"  # the model-version tag holding the sha256 of the registered bundle's manifest


def bundle_sha256(bundle_dir: str | Path) -> str:
    """Identity of a bundle: the sha256 of its manifest (which lists the sha256 of every file)."""
    import hashlib

    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()


def _make_pyfunc_class():
    import mlflow.pyfunc

    class EditedModelPyfunc(mlflow.pyfunc.PythonModel):
        """Prompts (or questions) in, the edited model's answers out.

        Input: a DataFrame with a ``prompt`` column (a list of strings works too). Output: a
        DataFrame with ``answer`` (as ``EditedModel.answer`` gives it: the assistant's turn when the base
        model has a chat template, else the greedy continuation up to its first line break) and ``routed``
        (whether the router sent the prompt to an edit). The base model named in the bundle's
        manifest is loaded through ``meg.lm.load_model``; a base model whose weights differ from the
        ones the bundle was built on is refused.
        """

        def load_context(self, context) -> None:
            from meg.editor import EditedModel

            self.model = EditedModel.load(context.artifacts[MODEL_ARTIFACT])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            prompts = _prompts_of(model_input)
            if not prompts:
                return pd.DataFrame({"answer": [], "routed": []})
            answers = self.model.answer(prompts)["answers"]
            routed = [j is not None for j in self.model.routed_edits(prompts)]
            return pd.DataFrame({"answer": answers, "routed": routed})

    EditedModelPyfunc.__module__ = __name__
    EditedModelPyfunc.__qualname__ = "EditedModelPyfunc"
    return EditedModelPyfunc


def __getattr__(name: str):
    # The pyfunc class subclasses an MLflow class; it is built on first use so that importing this
    # module does not import MLflow, and it is reachable as meg.tracking.EditedModelPyfunc so that a
    # saved model refers to it by name.
    if name == "EditedModelPyfunc":
        cls = _make_pyfunc_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _prompts_of(model_input) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = next((c for c in ("prompt", "question") if c in model_input.columns), model_input.columns[0])
        values = model_input[column].tolist()
    elif isinstance(model_input, dict):
        values = model_input.get("prompt", model_input.get("question", []))
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    prompts = [str(v).strip() for v in values]
    if any(not p for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    return prompts


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          outputs=Schema([ColSpec("string", "answer"), ColSpec("boolean", "routed")]))


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("meg", "torch", "transformers", "safetensors", "diffusers", "mlflow", "pandas"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    return out


def log_bundle_model(bundle_dir: str | Path, name: str = "meg-bundle", retries: int | None = None,
                     backoff: float | None = None) -> str:
    """Log a bundle as a pyfunc model in the active run; returns the logged model's URI.

    Retried as ``with_retries`` says (each attempt logs a new model; a failed one is left with status
    FAILED); returns only once the store holds every file of the bundle.
    """
    return with_retries(f"uploading the edit bundle {bundle_dir}", lambda: _log_verified(bundle_dir, name),
                        retries, backoff)


def _log_verified(bundle_dir: str | Path, name: str) -> str:
    """One attempt: log the model, then check the store holds all of it (else mark it FAILED)."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    info = mlflow.pyfunc.log_model(
        name=name, python_model=__getattr__("EditedModelPyfunc")(), artifacts={MODEL_ARTIFACT: str(bundle_dir)},
        signature=_signature(), pip_requirements=_requirements(),
        tags={SHA_TAG: bundle_sha256(bundle_dir)},
    )
    missing = missing_files(info.model_id, bundle_dir)
    if missing:
        MlflowClient().finalize_logged_model(info.model_id, LoggedModelStatus.FAILED)
        raise IncompleteUpload(f"the store lacks {len(missing)} file(s) of logged model {info.model_id} after "
                               f"its upload: {', '.join(missing[:3])}")
    return info.model_uri


def missing_files(model_id: str, bundle_dir: str | Path) -> list[str]:
    """Files of a logged bundle model that its artifact store does not hold, or holds at another size
    (paths inside the model: ``MLmodel`` and ``artifacts/bundle/...``)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    repo = get_artifact_repository(MlflowClient().get_logged_model(model_id).artifact_location)
    stored: dict[str, int | None] = {f.path: f.file_size for f in repo.list_artifacts() if not f.is_dir}
    todo = [f"artifacts/{MODEL_ARTIFACT}"]
    while todo:
        for f in repo.list_artifacts(todo.pop()):
            if f.is_dir:
                todo.append(f.path)
            else:
                stored[f.path] = f.file_size
    bundle_dir = Path(bundle_dir)
    want: dict[str, int | None] = {"MLmodel": None}
    want.update({f"artifacts/{MODEL_ARTIFACT}/{p.relative_to(bundle_dir).as_posix()}": p.stat().st_size
                 for p in sorted(bundle_dir.rglob("*")) if p.is_file()})
    return [path for path, size in want.items()
            if path not in stored or (size is not None and stored[path] is not None and stored[path] != size)]


def _find_logged_model(sha: str, bundle_dir: str | Path) -> str | None:
    """A logged model of this bundle whose upload finished and whose files the store holds, newest first."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    try:
        found = mlflow.search_logged_models(filter_string=f"tags.`{SHA_TAG}` = '{sha}'",
                                            order_by=[{"field_name": "creation_time", "ascending": False}],
                                            output_format="list")
    except Exception:  # older stores without logged-model search: log the model again
        return None
    for model in found:
        if model.status == LoggedModelStatus.READY and not missing_files(model.model_id, bundle_dir):
            return f"models:/{model.model_id}"
    return None


# -------------------------------------------------------------------------------- uploads

RETRIES_ENV = "MEG_STORE_RETRIES"  # attempts of one upload to the artifact store
BACKOFF_ENV = "MEG_STORE_BACKOFF"  # seconds before the second attempt, doubling after each failure
DEFAULT_RETRIES, DEFAULT_BACKOFF = 4, 5.0
_SLOW_DOWN = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
              "InternalError"}


class IncompleteUpload(Exception):
    """An upload that returned without error, after which the store does not hold all of it."""


def store_retries() -> tuple[int, float]:
    """(attempts, first wait in seconds) of an upload: ``MEG_STORE_RETRIES``, ``MEG_STORE_BACKOFF``."""
    from meg.errors import ConfigError

    try:
        attempts = int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES))
        backoff = float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF))
    except ValueError as e:
        raise ConfigError(f"{RETRIES_ENV}, {BACKOFF_ENV}: not a number: {e}") from None
    if attempts < 1 or not backoff >= 0:
        raise ConfigError(f"{RETRIES_ENV} must be at least 1 and {BACKOFF_ENV} at least 0; "
                          f"got {attempts} and {backoff}")
    return attempts, backoff


def store_failure(error: BaseException) -> str | None:
    """How an exception (or one it was raised from) failed the artifact store: "transient" (may pass:
    unreachable, connection dropped or timed out, 5xx, throttled, incomplete upload), "permanent"
    (will not pass by itself: no bucket, access denied, no credentials, ...), or None (not the store)."""
    transient: tuple[type, ...] = (IncompleteUpload, ConnectionError, TimeoutError)
    permanent: tuple[type, ...] = ()
    try:
        import requests

        transient += (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:
        pass
    try:
        from botocore import exceptions as boto

        transient += (boto.ConnectionError, boto.HTTPClientError)
        permanent += (boto.BotoCoreError, boto.ClientError)
    except ImportError:
        boto = None
    kind = None
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and not any(e is seen for seen in chain):
        chain.append(e)
        if isinstance(e, transient):
            return "transient"
        if boto is not None and isinstance(e, boto.ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or e.response.get("Error", {}).get("Code") in _SLOW_DOWN:
                return "transient"
        if isinstance(e, permanent):
            kind = "permanent"
        e = e.__cause__ or e.__context__
    return kind


def artifact_store() -> str:
    """Where this process's artifacts go: the experiment's artifact location, and the S3 endpoint if set."""
    import mlflow

    try:
        active = mlflow.active_run()
        experiment = (mlflow.get_experiment(active.info.experiment_id) if active
                      else mlflow.get_experiment_by_name(_configured["experiment"]))
        location = experiment.artifact_location
    except Exception:  # only for an error message: the tracking store may be failing too
        location = "(unknown artifact location)"
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return f"{location} (endpoint {endpoint})" if endpoint and location.startswith("s3") else location


def with_retries(what: str, attempt: Callable[[], T], retries: int | None = None,
                 backoff: float | None = None) -> T:
    """``attempt()``, again after a failure of the artifact store that may pass, waiting ``backoff``
    seconds before the second attempt and twice as long before each next (defaults: ``store_retries``).

    A store failure that will not pass, or the last one, raises StoreError naming the store, what
    failed, the number of attempts and the cause; other errors pass through unchanged.
    """
    from meg.errors import StoreError

    default_attempts, default_backoff = store_retries()
    attempts = default_attempts if retries is None else max(1, retries)
    wait = default_backoff if backoff is None else backoff
    n = 0
    while True:
        n += 1
        try:
            return attempt()
        except Exception as e:
            kind = store_failure(e)
            if kind is None:
                raise
            reason = f"{type(e).__name__}: {e}"
            if kind == "permanent" or n >= attempts:
                tries = f" after {n} attempts" if n > 1 else ""
                raise StoreError(f"artifact store {artifact_store()}: {what} failed{tries}: {reason}") from e
            delay = wait * 2 ** (n - 1)
            print(f"meg: {what}: attempt {n} of {attempts} failed ({reason}); retrying in {delay:.1f} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)


# -------------------------------------------------------------------------------- the registry


class Registry:
    """The registered model of the edit bundles and its aliases."""

    def __init__(self, name: str):
        from mlflow.tracking import MlflowClient

        self.name = name
        self.client = MlflowClient()

    def find(self, sha: str) -> str | None:
        """The version already registered for a bundle (by its sha256), if any."""
        try:
            found = self.client.search_model_versions(f"name = '{self.name}' and tags.`{SHA_TAG}` = '{sha}'")
        except Exception:
            found = [v for v in self.client.search_model_versions(f"name = '{self.name}'")
                     if v.tags.get(SHA_TAG) == sha]
        return str(min(int(v.version) for v in found)) if found else None

    def register(self, bundle_dir: str | Path, tags: dict[str, str]) -> tuple[str, bool]:
        """(version, new): the bundle's version, registering it (logging it first if needed) when new.

        The same bundle is registered once, however often promotion runs. The version is created
        only from a logged model whose upload finished and whose files the store holds (an earlier
        one, or one uploaded now with retries); otherwise StoreError, and no version.
        """
        import mlflow

        sha = bundle_sha256(bundle_dir)
        existing = self.find(sha)
        if existing is not None:
            self.set_tags(existing, tags)
            return existing, False
        uri = with_retries(f"uploading the edit bundle {bundle_dir} to register it as {self.name}",
                           lambda: _find_logged_model(sha, bundle_dir) or _log_verified(bundle_dir, "meg-bundle"))
        mv = mlflow.register_model(uri, self.name, tags={SHA_TAG: sha, **tags})
        return str(mv.version), True

    def champion(self, alias: str) -> dict | None:
        """{"version", "tags"} of the version holding ``alias``, or None."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None
        return {"version": str(mv.version), "tags": dict(mv.tags)}

    def holders(self, alias: str) -> list[str]:
        """Every version listing ``alias`` (exactly one after a promotion)."""
        return sorted((str(v.version) for v in self.client.search_model_versions(f"name = '{self.name}'")
                       if alias in (self.client.get_model_version(self.name, v.version).aliases or [])), key=int)

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    @contextmanager
    def promotion_lock(self) -> Iterator[None]:
        """Hold while reading the champion and moving its alias, so that two promotions cannot both
        replace the same champion. An exclusive file lock beside a SQLite store serialises the
        promotions on that machine; a tracking server offers no compare-and-set on aliases, so
        there it locks nothing."""
        import mlflow

        uri = mlflow.get_tracking_uri()
        if not uri.startswith("sqlite:///"):
            yield
            return
        import fcntl

        with open(Path(uri[len("sqlite:///"):]).with_suffix(".promote.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, version, k, str(v))

    def download_bundle(self, version: str, dst: str | Path) -> Path:
        """The bundle directory of a registered version, downloaded under ``dst``."""
        from mlflow.artifacts import download_artifacts

        Path(dst).mkdir(parents=True, exist_ok=True)
        local = Path(download_artifacts(artifact_uri=f"models:/{self.name}/{version}/artifacts/{MODEL_ARTIFACT}",
                                        dst_path=str(dst)))
        tags = self.client.get_model_version(self.name, version).tags
        check_download(local, tags.get(SHA_TAG), f"models:/{self.name}/{version}")
        return local


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(params: dict) -> None:
    import mlflow

    flat = {k: (str(v)[:500] if v is not None else "None") for k, v in _flatten(params).items()}
    mlflow.log_params(flat)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    import mlflow

    clean = {k: float(v) for k, v in _flatten(metrics).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Upload one file into the active run's artifacts (retried as ``with_retries`` says)."""
    import mlflow

    with_retries(f"uploading {path}", lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))


def download_bundle(model_uri: str, dst: Path) -> Path:
    """Download the edit bundle of a registered pyfunc model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``).

    The pyfunc model carries the bundle as its artifact named ``bundle`` (``artifacts/bundle`` in
    the model directory; the path is read from the model's MLmodel file). Returns the local bundle
    directory under ``dst``. Unknown models, aliases or versions, and models without a bundle, raise
    BundleError naming the reference.
    """
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from meg.errors import BundleError

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    uri = model_uri.rstrip("/")
    try:
        mlmodel = Path(download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(dst / "mlmodel")))
    except (MlflowException, OSError) as e:
        raise BundleError(f"{model_uri}: cannot resolve the registered model: {e}") from e
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get("bundle")
    if entry is None:
        raise BundleError(f"{model_uri}: the model has no artifact named 'bundle' (not an edit-bundle pyfunc model)")
    rel = entry.get("path", "artifacts/bundle") if isinstance(entry, dict) else "artifacts/bundle"
    try:
        local = Path(download_artifacts(artifact_uri=f"{uri}/{rel}", dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise BundleError(f"{model_uri}: cannot download its bundle ({rel}): {e}") from e
    if not (local / "manifest.json").is_file():
        raise BundleError(f"{model_uri}: the downloaded '{rel}' is not an edit bundle (no manifest.json)")
    check_download(local, _registered_sha(uri), model_uri)
    return local


def _registered_sha(model_uri: str) -> str | None:
    """The bundle sha256 a registry reference's version was registered with (``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``); None for other references or versions registered without it."""
    import mlflow

    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
    if not ref:
        return None
    client = mlflow.MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        return None
    return (version.tags or {}).get(SHA_TAG)


def check_download(bundle_dir: Path, expected: str | None, ref: str) -> None:
    """Refuse a downloaded bundle whose manifest is not the one its version was registered with. Every file is
    then checked against the manifest when the bundle is loaded (``EditedModel.load``)."""
    import warnings

    from meg.errors import BundleError

    if expected is None:
        warnings.warn(f"{ref}: the version has no '{SHA_TAG}' tag; the downloaded bundle is checked against its own "
                      "manifest only")
        return
    got = bundle_sha256(bundle_dir)
    if got != expected:
        raise BundleError(f"{ref}: the downloaded bundle's manifest has sha256 {got[:16]}..., but the version was "
                          f"registered with {expected[:16]}...: the stored artifact changed; not used")
