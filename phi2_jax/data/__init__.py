"""Text in, token batches out: tokenizers, lazily read sources, memory-mapped token files, the Grain
pipeline (packing, mixing, shuffling, per-process sharding) and the tokenize-once command.
"""
