"""train: CoVR models on transformers classes, HN-NCE, hard-negative queue, samplers, combiners
and the DeepSpeed training loop. Not built yet: see issues 4 and 5."""
