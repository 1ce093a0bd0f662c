from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def attach(params: str, prepared: Input[Dataset], fitted: Input[Dataset], encoder: Input[Model], router: Input[Model],
           generator: Input[Model], tracking_uri: str, job_id: str, bundle: Output[Model],
           metrics: Output[Metrics]):
    """Stage attach (meg.stages.attach): the edit bundle, logged as an MLflow pyfunc model."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import attach as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(fitted.path), Path(encoder.path), Path(router.path),
                         Path(generator.path), Path(bundle.path))

    component_stage("attach", params, tracking_uri, job_id, call, metrics)
