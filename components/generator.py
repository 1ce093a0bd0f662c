from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def generator(params: str, prepared: Input[Dataset], fitted: Input[Dataset], encoder: Input[Model], cache_dir: str,
              device: str, tracking_uri: str, job_id: str, compiled_for: str, generator: Output[Model],
              metrics: Output[Metrics]):
    """Stage generator (meg.stages.generator) on `device`. `compiled_for` is the generator.weights the pipeline
    was compiled for: with "generator" the step has a GPU, with "lookup" none (the stage then trains nothing)."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import generator as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(fitted.path), Path(encoder.path), Path(generator.path),
                         Path(cache_dir) if cache_dir else None, progress=False, compiled_for=compiled_for)

    component_stage("generator", params, tracking_uri, job_id, call, metrics, device=device)
