"""Edit bundles for people who use them: make one from a fact file, open one from a path or the registry.

``make_bundle`` is what ``meg edit`` runs: read the facts (every problem reported at once), load the
base model, run the same MeG build the pipeline stages run (``meg.editor.build``), with a work
directory so that an interrupted edit resumes where it stopped, and save the bundle.

``open_model`` is what ``meg ask``, ``meg chat`` and ``meg serve`` run: MODEL is a bundle directory
or a registry reference such as ``models:/meg-editor@champion``, whose bundle is downloaded into a
temporary directory (``meg.tracking.download_bundle``) and read into memory.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meg.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from meg.editor import EditedModel, MegConfig

REGISTRY_PREFIX = "models:/"


@dataclass
class EditJob:
    """Everything ``meg edit`` needs; checked before any work starts."""

    facts: Path  # a fact file in any format meg.facts reads
    out: Path  # the bundle directory to write (replaced atomically when it exists)
    model: str = "smollm2-135m"  # base model: registry name, local directory or hub id
    work_dir: Path | None = None  # fitted weights and generator checkpoints; default: OUT.work beside the bundle
    limit: int | None = None  # only the first N facts (after de-duplication)
    fmt: str = "auto"  # fact file format (see meg.facts)

    def __post_init__(self) -> None:
        self.facts, self.out = Path(self.facts), Path(self.out)
        if self.work_dir is None:
            self.work_dir = self.out.with_name(self.out.name + ".work")
        self.work_dir = Path(self.work_dir)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"edit: bad value for 'limit': {self.limit!r} (an integer >= 1)")
        if self.out.exists() and not (self.out / "manifest.json").is_file():
            raise ConfigError(f"edit: bad value for 'out': {self.out} exists and is not an edit bundle; "
                              "refusing to replace it")


def load_config(path: str | Path | None) -> "MegConfig":
    """A MegConfig from a JSON or YAML file of its fields (None: the defaults)."""
    from meg.editor import MegConfig

    if path is None:
        return MegConfig()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from e
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # yaml.YAMLError and json.JSONDecodeError are both ValueErrors or report as one
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of MegConfig fields, got {type(data).__name__}")
    known = set(MegConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
    try:
        return MegConfig(**data)
    except TypeError as e:  # e.g. an unknown key inside the 'fit' section
        raise ConfigError(f"{path}: {e}") from e


def make_bundle(job: EditJob, cfg: "MegConfig", progress: bool = True) -> "EditedModel":
    """Facts -> base model -> MeG build (resumable in ``job.work_dir``) -> bundle at ``job.out``."""
    from meg import editor, lm
    from meg.facts import read_facts

    edits = read_facts(job.facts, job.fmt)  # FactsError lists every problem before anything is loaded
    if job.limit:
        edits = edits[: job.limit]
    if not edits:
        raise ConfigError(f"{job.facts}: no facts to edit")
    loaded = lm.load_model(job.model, device=cfg.device)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    model = editor.build(loaded, edits, cfg, work_dir=job.work_dir, progress=progress)
    record_edits(model, edits)
    model.save(job.out)
    return model


def record_edits(model: "EditedModel", edits: list) -> None:
    """Keep each edit's id, prompt and targets in the bundle, so explanations can show the nearest edit."""
    model.info["edits"] = [{"id": e.id, "prompt": e.prompt, "target_new": e.target_new,
                            "target_old": e.target_old} for e in edits]


def is_registry_ref(ref: str) -> bool:
    return str(ref).startswith(REGISTRY_PREFIX)


def open_model(ref: str | Path, loaded=None) -> "EditedModel":
    """Load an edited model from a bundle directory or a ``models:/NAME@ALIAS`` (or ``/VERSION``) reference."""
    from meg.editor import EditedModel

    if is_registry_ref(str(ref)):
        from meg import tracking

        with tempfile.TemporaryDirectory(prefix="meg-bundle-") as tmp:
            bundle = tracking.download_bundle(str(ref), Path(tmp))
            return EditedModel.load(bundle, loaded=loaded)
    path = Path(ref)
    if not path.is_dir():
        raise BundleError(f"{ref}: no such bundle directory (or use a registry reference like "
                          f"{REGISTRY_PREFIX}meg-editor@champion)")
    return EditedModel.load(path, loaded=loaded)
