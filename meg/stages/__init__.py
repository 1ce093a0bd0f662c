"""The pipeline stages, one module each, chaining the library's build steps with files in between.

Every stage is a function ``run(view, <input dirs>, out_dir, ...) -> StageResult``: ``view`` is the
part of params.yaml the stage reads (``meg.config.stage_view``), inputs and outputs are directories.
The same functions run under ``dvc repro`` (through ``meg <stage>``) and in the Kubeflow components.
They know nothing of DVC, Kubeflow or MLflow: the caller logs the returned ``StageResult``.
"""

from meg.stages.common import StageResult

__all__ = ["StageResult"]
