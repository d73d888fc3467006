"""Benchmarks: task files in the public datasets' layouts (samples in `samples/`), answer extraction,
the sandbox that runs generated code, the evaluation command and the lm_eval adapter.
"""
