"""eval: how good a CoVR model is, and what it retrieves.

`metrics` (recall@K, mAP@K, any-target recall, ties), `search` (FAISS exact / IVF / HNSW,
max-token re-ranking), `embed` (images and composed queries, split across ranks), `retrieval`
(embedding a split's shards), `protocols` (WebVid-CoVR, Dense-WebVid-CoVR, CIRR, FashionIQ,
CIRCO -> `Evaluation`), `video_protocols` (TF-CoVR, EgoCVR: clips, several targets per query,
per-query galleries), `explain` (attention
heat maps), `report` (retrieval grids, HTML, plots) and `run` (one evaluation job as
`launch/eval.py` runs it, logged to MLflow).
"""
