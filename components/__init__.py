"""Kubeflow components: one per pipeline stage, each a thin shim over the stage function in meg.stages.

Every component runs in the project's image (``IMAGE``, built from the Dockerfile), which has the
package and the offline models installed: nothing is installed when a step runs
(``install_kfp_package=False``; kfp is a dependency of the package). Imports happen inside the
component functions, as lightweight components require.
"""

IMAGE = "meg:0.1.0"  # built with `make image` (Makefile IMAGE); tests/pipeline/test_container.py keeps them equal
