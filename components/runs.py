"""The pipeline's own MLflow run: opened first, closed by the exit handler whatever happened.

An exit task may not depend on other tasks, so the closing step finds the run by the Kubeflow job id
(``dsl.PIPELINE_JOB_ID_PLACEHOLDER``) the opening step tagged it with.
"""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_run(tracking_uri: str, experiment: str, job_id: str) -> str:
    """Open the pipeline run the stage runs nest under; returns its id ('' without tracking)."""
    import os
    from pathlib import Path

    if not tracking_uri:
        return ""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from meg import tracking

    tracking.configure(Path.cwd(), experiment)
    return tracking.start_pipeline_run("kubeflow", {"meg.orchestrator": "kubeflow", "meg.kfp_job_id": job_id})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def end_run(tracking_uri: str, experiment: str, job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Close the pipeline run as FINISHED or FAILED (the pipeline's exit handler)."""
    import os
    from pathlib import Path

    if not tracking_uri:
        return
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from meg import tracking

    tracking.configure(Path.cwd(), experiment)
    run_id = tracking.find_pipeline_run("meg.kfp_job_id", job_id)
    if run_id:
        tracking.end_pipeline_run(run_id, status.state == "SUCCEEDED")
