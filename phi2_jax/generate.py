"""`python -m phi2_jax.generate`: the command's name; its code is `phi2_jax.inference.cli`."""

from phi2_jax.inference.cli import main

if __name__ == "__main__":
    main()
