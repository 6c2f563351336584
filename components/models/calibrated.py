"""Calibrating a model with llm-compressor's ``oneshot``, and letting go of it after.

The stages that calibrate (quantize, prune's sparsegpt and wanda) hand ``oneshot`` a
model on the CPU (``calibrate``). A stage that reloads its output (the self-check)
must not still hold the calibrated model while it does: at 8B that is 5.3 GiB
compressed (quantize) or 16 GB dense (prune) on top of the reload. Dropping the
stage's own reference is not enough; two things inside the libraries keep the model
alive after ``oneshot`` returns (``release``).
"""

from __future__ import annotations

from typing import Any


def calibrate(model: Any, recipe: Any, samples: list[list[int]], sequential_offload_device: str = "cpu") -> None:
    """Run ``oneshot`` with ``recipe`` (llm-compressor modifiers) over tokenized
    calibration windows; with no windows, data-free.

    ``model`` is meant to live on the CPU: with data, llm-compressor 0.14's sequential
    pipeline places every module's weights where they are and onloads one decoder
    layer at a time to its main device (``get_main_device()``: the first GPU whenever
    one is visible, whatever device the model is on) for the layer's calibration, so
    a model larger than GPU memory still calibrates, and the GPU holds one layer, its
    statistics and one batch's activations. The activations between layers are kept
    on ``sequential_offload_device`` ('cpu': GPU memory stays at one layer's)."""
    from llmcompressor import oneshot

    kwargs: dict[str, Any] = {}
    if samples:
        from datasets import Dataset

        kwargs = {
            "dataset": Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]}),
            "max_seq_length": max(len(s) for s in samples), "num_calibration_samples": len(samples),
            "shuffle_calibration_samples": False, "sequential_offload_device": sequential_offload_device,
        }
    oneshot(model=model, recipe=recipe, **kwargs)


def release(device: str) -> None:
    """Free the calibrated model once the caller has dropped its own references.

    1. llm-compressor's session holds the model: it is reset.
    2. The sequential pipeline (every calibrated scheme: gptq, awq, w8a8, sparsegpt,
       wanda) traces the model by executing its forward's source in a copy of the
       defining module's namespace, with ``self`` bound to the model; the
       ``torch.fx.wrap`` calls in that source register the namespace in torch.fx's
       module-level ``_wrapped_fns_to_patch`` for the life of the process. Measured at
       8B, gptq-w4a16: peak host RSS 22.3 GiB against ``oneshot``'s 20.2, the self-check's
       reload on top of the still-alive compressed model (fp8, which traces nothing,
       was not affected). Those registrations serve only that finished trace, so they
       are dropped: recognised by the ``"torch.fx.wrap"`` key llm-compressor adds to its
       copy (no module's real globals hold a dotted name) and a Module as ``self``.
       Dropping the registrations was not enough: the copy's functions and a closure
       cell still form a cycle that something outside Python's collector keeps alive,
       holding the *inner* model (``self`` is ``model.model``; measured at 8B and 14B
       after this was first fixed: peak host RSS still 2.0-2.1 GiB above ``oneshot``'s,
       and on the CPU the embedding table stayed alive under the self-check). So the
       copy is emptied too; it served only the finished trace.
    """
    import sys

    import torch
    from llmcompressor.core import reset_session
    from llmpress.components.models.io import free_memory

    reset_session()
    try:
        from torch.fx._symbolic_trace import _wrapped_fns_to_patch as registry
    except ImportError:  # a torch that keeps no such registry keeps nothing alive through it
        registry = {}
    traced = {key: namespace for key, namespace in registry.items()
              if "torch.fx.wrap" in namespace and isinstance(namespace.get("self"), torch.nn.Module)}
    for key in traced:  # all first: several registrations share one namespace
        del registry[key]
    for namespace in traced.values():
        if namespace is not getattr(sys.modules.get(namespace.get("__name__", "")), "__dict__", None):
            namespace.clear()
    free_memory(device)
