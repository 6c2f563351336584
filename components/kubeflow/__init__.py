"""The Kubeflow-facing layer: the thin KFP components (``shells``), the step functions
they call inside a pod or a kfp.local subprocess (``steps``, ``distill_step``), and the
Kubeflow Trainer TrainJob manifests (``trainjob``). Everything below this package runs
without Kubeflow; this is the only part of ``components`` that may import kfp."""
