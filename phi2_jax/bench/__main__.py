from phi2_jax.bench.suites import main

main()
