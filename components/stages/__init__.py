"""Stage logic: one module per technique, each a typed config and a plain ``run()``.

No kfp, boto3 or mlflow in here: stages take a model directory, a config and data,
write a model directory and return metrics, so they run (and are tested) anywhere.
"""
