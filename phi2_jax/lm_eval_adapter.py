"""`python -m phi2_jax.lm_eval_adapter`: the command's name; its code is `phi2_jax.evaluation.lm_eval_adapter`."""

from phi2_jax.evaluation.lm_eval_adapter import main

if __name__ == "__main__":
    main()
