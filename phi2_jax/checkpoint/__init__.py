"""Orbax checkpoints: a training run's step folders (save, restore, fall back past damaged ones) and the
converter's tensor-at-a-time reads and writes.
"""
