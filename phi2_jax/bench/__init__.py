"""`python -m phi2_jax.bench`: speed and memory against transformers, measured side by side."""
