"""sharding: WebDataset tar shards of CoVR triplets (packing, manifest, verification) and the
streaming reader training and evaluation use. Not built yet: see issue 3."""
