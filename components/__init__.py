"""llmpress components, in three layers that import only downward:

- ``stages/<technique>/``: stage logic; no kfp, boto3 or mlflow, no other stage;
- plumbing shared by stages: ``artifacts/`` (the local and S3 store), ``tracking/``
  (MLflow, with its spool), ``report/``, ``models/`` (model I/O and weight facts),
  ``data`` (calibration and evaluation text), ``errors``; no kfp;
- ``kubeflow/``: the thin KFP components and the step functions they call.

tests/test_layers.py enforces these rules."""
