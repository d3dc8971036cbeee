"""sharding: WebDataset tar shards of CoVR triplets.

- `format`: the record layout (member names, encoding, decoding, the one image decoder).
- `records`: records from WebVid-CoVR triplets or CIRR; `writer`: the one shard writer (atomic,
  stats file last, `finished`) for packing and embedding, jobs on local processes or Ray tasks;
  `manifest`: the one manifest writer, `read_manifest` and `verify`; `pack`: the entry points
  (`pack`, `pack_cirr`, `pack_splits`), resumable; `embed`: shards with precomputed targets.
- `reader`: `ShardReader`, the training stream (equal batches on every rank, deterministic,
  resumable mid-epoch, tolerant of corrupt shards and samples), `open_shards` (a split's manifest
  read once) and `iter_records` for evaluation; `remote`: shards at an http(s) or object-store
  URL (retried ranged reads, the manifest fetched once, an optional bounded local cache).
- `batch`: the data-model contract: `collate`, `augment`, `to_device`, `Task`, `Composed`.
- `groups`: k-means sampler groups from packed target embeddings.
"""
