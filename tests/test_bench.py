"""The benchmark runs end to end at a tiny size and fills every column (a smoke test: no timing asserted)."""

from phi2_jax.bench import main


def test_bench_smoke_produces_every_suite_and_column(tmp_path):
    rows = main(["all", "--config", "nano", "--seq", "32", "--batch", "2", "--new-tokens", "8", "--repeats", "1",
                 "--compare", "transformers", "--convert-preset", "nano", "--work-dir", str(tmp_path),
                 "--output", str(tmp_path / "bench.json")])
    suites = {(r["suite"], r["impl"]) for r in rows}
    for suite in ("train", "prefill", "decode", "convert"):
        assert (suite, "phi2_jax") in suites and (suite, "transformers") in suites, suite
    for row in rows:
        assert row["peak_rss_mb"] > 0
        if row["suite"] != "convert":
            assert row["tokens_per_s"] > 0 and row["median_s"] > 0
        if row["suite"] in ("train", "prefill"):
            assert 0 < row["mfu"]
    ours = [r for r in rows if r["impl"] == "phi2_jax" and r["suite"] != "convert"]
    assert all("speedup_vs_transformers" in r for r in ours)
    assert (tmp_path / "bench.json").stat().st_size > 0
