"""data: everything that turns raw corpora into triplets.

- `webvid_covr`: the published WebVid-CoVR CSV format (read, write, resolve video files).
- `video`: PyAV decoding (middle / random / N centred frames), resize, CLIP normalisation.
- `synthetic`: a deterministic synthetic video corpus (real H.264 mp4) that needs composition.
- `captions`: WebVid-style caption tables and per-video metadata.
- `mining`: one-word-difference triplet mining from any caption table, split into train/val/test.
- `filtering`: the author / category metadata filter.
- `benchmarks`: CIRR, FashionIQ and CIRCO annotation readers.
- `video_benchmarks`: TF-CoVR and EgoCVR annotation readers (clips, several targets per query).
"""
