"""`python -m phi2_jax.train`: the command's name; its code is `phi2_jax.training.train_command`."""

from phi2_jax.training.train_command import main

if __name__ == "__main__":
    main()
