"""train: training CoVR models.

- `models`: BLIP-2 / BLIP CoVR models on the transformers classes (one `forward(Task, ...)`);
  `lavis`: LAVIS / CoVR checkpoints mapped onto them by parameter name; `combiners`.
- `losses` (HN-NCE), `objective` (embeddings, global negatives, queue: the loss of a batch),
  `queue` (cross-rank hard-negative queue, EMA encoder), `gradcache` (the loss over a batch
  larger than memory), `distributed` (tensor collectives).
- `loader` (the training data and its whole position; `RunShape`), `state`, `checkpointer` and
  `checkpoint` (saving, verifying, falling back, resuming on any world size), `resume` (the
  settings check), `export` (transformers-format export and loading).
- `engine` (DeepSpeed set-up), `network`, `optim`, `tracking` (MLflow, never blocking),
  `embedder` (the frozen target path for the embed step), and `loop`: the training loop.
"""
