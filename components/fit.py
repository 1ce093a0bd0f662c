from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_shard(params: str, shard: int, n_shards: int, prepared: Input[Dataset], cache_dir: str, tracking_uri: str,
              job_id: str, weights: Output[Dataset]):
    """Stage fit (meg.stages.fit) for shard `shard` of `n_shards`; the per-edit cache lives in cache_dir."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import fit as stage

    def call(view, registry):
        return stage.run(view, Path(prepared.path), Path(weights.path), Path(cache_dir) if cache_dir else None,
                         (shard, n_shards), progress=False)

    component_stage("fit", params, tracking_uri, job_id, call)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_merge(params: str, prepared: Input[Dataset], shards: Input[List[Dataset]], tracking_uri: str,
              job_id: str, fitted: Output[Dataset], metrics: Output[Metrics]):
    """The shards' weights back in the order of the edit set (every edit exactly once)."""
    from pathlib import Path

    from meg.runner import component_stage
    from meg.stages import fit as stage

    def call(view, registry):
        from meg import config

        return stage.merge(Path(prepared.path), [Path(s.path) for s in shards], Path(fitted.path), config.flat(view))

    component_stage("fit", params, tracking_uri, job_id, call, metrics)
