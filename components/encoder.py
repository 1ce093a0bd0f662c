from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def encoder(params: str, prepared: Input[Dataset], cache_dir: str, tracking_uri: str, job_id: str,
            encoder: Output[Model], metrics: Output[Metrics]):
    """Stage encoder (meg.stages.encoder): the query encoder fine-tuned on pseudo-edits."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import encoder as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(encoder.path), Path(cache_dir) if cache_dir else None,
                         progress=False)

    component_stage("encoder", params, tracking_uri, job_id, call, metrics)
