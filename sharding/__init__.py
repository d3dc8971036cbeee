"""sharding: WebDataset tar shards of CoVR triplets.

- `pack`: triplets + videos -> `PREFIX-NNNNNN.tar` shards, atomic and resumable, with per-shard
  stats (the completion marker) and `manifest.json` (counts, bytes, checksums, skipped samples,
  config); local processes or Ray tasks; `verify` re-reads shards against the manifest.
- `reader`: `ShardReader`, the training stream (equal batches on every rank, deterministic,
  resumable mid-epoch, tolerant of corrupt shards and samples) and `iter_records` for evaluation.
"""
