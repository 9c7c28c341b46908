"""Training machinery: slice tables from manifests and datasets, augmentation, sampling, patient-level splits,
the training loop, checkpoints (safetensors + JSON) and run folders. Beside the inference path, not inside it."""
