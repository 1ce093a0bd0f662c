"""The Kubeflow pipeline: the DAG of components (``dag``), compiling it (``compile``), running it on
this machine with kfp's subprocess runner (``local``) and scheduling recurring runs (``schedule``)."""
