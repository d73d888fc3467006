"""Running a trained model: KV-cache generation and sampling, decoding's per-backend weight and cache
preparation, greedy samples, and log-likelihood scoring.
"""
