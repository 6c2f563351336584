"""llmpress components: stage logic (``stages``), plumbing shared by stages, and the
thin Kubeflow wrappers (``kubeflow``). Layers import only downward: stage logic never
imports kfp, boto3 or mlflow."""
