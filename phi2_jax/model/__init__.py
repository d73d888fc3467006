"""The Phi transformer: parameters, the one forward pass, attention, LoRA adapters and activation edits.

Depends only on the config and sharding rules; knows nothing of files, data or training.
"""
