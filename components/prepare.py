from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(params: str, data_dir: str, cache_dir: str, tracking_uri: str, job_id: str,
            prepared: Output[Dataset], metrics: Output[Metrics]):
    """Stage prepare (meg.stages.prepare): edits, pseudo-edits, locality answers. data_dir '' = packaged facts."""
    import tempfile
    from pathlib import Path

    from meg.data import restore_raw_data
    from meg.runner import component_stage
    from meg.stages import prepare as stage

    if not data_dir:
        data_dir = tempfile.mkdtemp(prefix="meg-data-")
        restore_raw_data(data_dir)

    def call(view, registry):
        view["prepare"]["data_dir"] = str(Path(data_dir).resolve())
        return stage.run(view, Path(prepared.path), cache_dir=Path(cache_dir) if cache_dir else None, progress=False)

    component_stage("prepare", params, tracking_uri, job_id, call, metrics)
