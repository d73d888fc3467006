"""`python -m phi2_jax.evaluate`: the command's name; its code is `phi2_jax.evaluation.harness`."""

from phi2_jax.evaluation.harness import main

if __name__ == "__main__":
    main()
