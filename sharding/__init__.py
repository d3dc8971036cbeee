"""sharding: WebDataset tar shards of CoVR triplets.

- `format`: the record layout (member names, encoding, decoding, the one image decoder).
- `records`: records from WebVid-CoVR triplets or CIRR; `writer`: one shard written atomically,
  jobs on local processes or Ray tasks; `manifest`: `manifest.json` and `verify`; `pack`: the
  entry points (`pack`, `pack_cirr`, `pack_splits`), resumable.
- `reader`: `ShardReader`, the training stream (equal batches on every rank, deterministic,
  resumable mid-epoch, tolerant of corrupt shards and samples) and `iter_records` for evaluation.
- `groups`: k-means sampler groups from packed target embeddings.
"""
