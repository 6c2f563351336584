"""Stage logic: one package per technique (``quantize``, ``prune``, ``distill``,
``evaluate``), each exposing its typed config and a plain ``run()`` at the package's top
and keeping its helpers inside.

No kfp, boto3 or mlflow in here, and no stage imports another: stages take a model
directory, a config and data, write a model directory and return metrics, so they run
(and are tested) anywhere. tests/test_layers.py enforces it.
"""
