"""`python -m phi2_jax.pretokenize`: the command's name; its code is `phi2_jax.data.pretokenize`."""

from phi2_jax.data.pretokenize import main

if __name__ == "__main__":
    main()
