from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params: str, prepared: Input[Dataset], bundle: Input[Model], tracking_uri: str, job_id: str,
             report: Output[Dataset], metrics: Output[Metrics]):
    """Stage evaluate (meg.stages.evaluate): the bundle and the baselines on every edit."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import evaluate as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(bundle.path) / "bundle", Path(report.path))

    component_stage("evaluate", params, tracking_uri, job_id, call, metrics)
