"""`python -m phi2_jax.convert`: the command's name; its code is `phi2_jax.hf.convert`."""

from phi2_jax.hf.convert import main

if __name__ == "__main__":
    main()
