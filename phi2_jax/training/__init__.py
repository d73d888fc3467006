"""The trainer: run configs, optimiser, the jitted step, metrics and the training loop with its
checkpoints, preemption and multi-process start.
"""
