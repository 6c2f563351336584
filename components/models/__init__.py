"""Plumbing: models. Loading and saving Hugging Face checkpoints (safetensors only), the
builtin models, and the facts about a model's weights that several stages share
(parameter counts and sizes, sparsity patterns, quantization group sizes).
Imports no kfp, boto3 or mlflow."""
