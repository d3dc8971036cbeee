"""eval: gallery embedding, FAISS search, recall@K, the benchmark protocols, explanations and
reports. Not built yet: see issue 6."""
