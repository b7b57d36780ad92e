"""rerank-worker: bulk and background reranking through hosted rerank APIs."""
