from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(params: str, prepared: Input[Dataset], report: Input[Dataset], bundle: Input[Model], tracking_uri: str,
            job_id: str, decision: Output[Dataset], metrics: Output[Metrics]) -> bool:
    """Stage promote (meg.stages.promote): register the bundle; move the champion alias only if it earns it."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import promote as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(report.path), Path(bundle.path) / "bundle",
                         Path(decision.path), registry)

    result = component_stage("promote", params, tracking_uri, job_id, call, metrics)
    return bool(result.metrics["promoted"])
