"""The DAG: the same stages as dvc.yaml, as containerised steps.

    start_run -> prepare -+-> fit_shard x N (ParallelFor) -> fit_merge -+-> generator (GPU*) -> attach
                          +-> encoder -+------------------------------------+                  ^
                                       +-> router ---------------------------------------------+
    attach -> evaluate -> promote;  end_run: the exit handler, closes the MLflow pipeline run
    * only when compiled for generator.weights "generator": with "lookup" the step trains nothing

The spec is compiled for one ``generator.weights`` setting (``build(weights=...)``; ``meg pipeline
compile`` reads it from params.yaml): only a weight source that samples from the generator
(``meg.sources``) gets a GPU for the generator step, and the step refuses params that choose another
setting than the one it was compiled for.

Every step finds the pipeline's MLflow run by the Kubeflow job id it was tagged with.

Pipeline parameters: ``params`` (the text of params.yaml, validated by every step), ``data_dir``
(raw facts as mounted in the steps; '' = the copies packaged in the image), ``cache_dir`` (a volume
shared by the runs: the per-edit fit cache and the generator's warm start; '' = none),
``tracking_uri`` (MLflow; '' = not tracked, and promotion refuses to run), ``experiment`` and
``generator_device`` (the device of the GPU step).
"""

from kfp import dsl

from components.attach import attach
from components.encoder import encoder
from components.evaluate import evaluate
from components.fit import fit_merge, fit_shard
from components.generator import generator
from components.prepare import prepare
from components.promote import promote
from components.router import router
from components.runs import end_run, start_run

GPU_TYPE = "nvidia.com/gpu"


def build(shards: int = 4, gpu_type: str = GPU_TYPE, weights: str = "lookup"):
    """The pipeline function, with per-edit fitting fanned out over ``shards`` parallel steps, for the
    ``generator.weights`` setting ``weights`` (the generator step gets a GPU only when it trains a generator)."""
    from meg.sources import SOURCES

    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    if weights not in SOURCES:
        raise ValueError(f"weights must be one of {', '.join(sorted(SOURCES))}, got {weights!r}")
    gpu = SOURCES[weights].trains_generator

    @dsl.pipeline(name="meg", description="MeG knowledge editing: fit, encode, route, generate, attach, evaluate, promote")
    def meg_pipeline(params: str, data_dir: str = "", cache_dir: str = "", tracking_uri: str = "",
                     experiment: str = "meg", generator_device: str = "cuda"):
        job = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        closing = end_run(tracking_uri=tracking_uri, experiment=experiment, job_id=job).set_caching_options(False)
        with dsl.ExitHandler(closing, name="tracked-run"):
            opened = start_run(tracking_uri=tracking_uri, experiment=experiment, job_id=job).set_caching_options(False)
            prep = prepare(params=params, data_dir=data_dir, cache_dir=cache_dir, tracking_uri=tracking_uri,
                           job_id=job).after(opened)
            with dsl.ParallelFor(items=list(range(shards)), parallelism=shards, name="fit-shards") as shard:
                part = fit_shard(params=params, shard=shard, n_shards=shards, prepared=prep.outputs["prepared"],
                                 cache_dir=cache_dir, tracking_uri=tracking_uri, job_id=job)
            fitted = fit_merge(params=params, prepared=prep.outputs["prepared"],
                               shards=dsl.Collected(part.outputs["weights"]), tracking_uri=tracking_uri,
                               job_id=job)
            enc = encoder(params=params, prepared=prep.outputs["prepared"], cache_dir=cache_dir,
                          tracking_uri=tracking_uri, job_id=job)
            rout = router(params=params, prepared=prep.outputs["prepared"], encoder=enc.outputs["encoder"],
                          tracking_uri=tracking_uri, job_id=job)
            gen = generator(params=params, prepared=prep.outputs["prepared"], fitted=fitted.outputs["fitted"],
                            encoder=enc.outputs["encoder"], cache_dir=cache_dir, device=generator_device,
                            tracking_uri=tracking_uri, job_id=job, compiled_for=weights)
            if gpu:
                gen.set_accelerator_type(gpu_type).set_accelerator_limit(1)
            bundle = attach(params=params, prepared=prep.outputs["prepared"], fitted=fitted.outputs["fitted"],
                            encoder=enc.outputs["encoder"], router=rout.outputs["router"],
                            generator=gen.outputs["generator"], tracking_uri=tracking_uri, job_id=job)
            ev = evaluate(params=params, prepared=prep.outputs["prepared"], bundle=bundle.outputs["bundle"],
                          tracking_uri=tracking_uri, job_id=job)
            # the registry is outside the pipeline's inputs: never reuse a cached decision
            promote(params=params, prepared=prep.outputs["prepared"], report=ev.outputs["report"],
                    bundle=bundle.outputs["bundle"], tracking_uri=tracking_uri,
                    job_id=job).set_caching_options(False)

    return meg_pipeline
