from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def router(params: str, prepared: Input[Dataset], encoder: Input[Model], tracking_uri: str, job_id: str,
           router: Output[Model], metrics: Output[Metrics]):
    """Stage router (meg.stages.router): fitted on the edits, threshold calibrated on pseudo-edits."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import router as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(encoder.path), Path(router.path), progress=False)

    component_stage("router", params, tracking_uri, job_id, call, metrics)
