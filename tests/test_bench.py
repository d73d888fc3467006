"""The benchmark runs end to end at a tiny size and fills every column (a smoke test: no timing asserted),
and the counts its utilisation figures rest on."""

from phi2_jax.bench.suites import main, markdown
from phi2_jax.config import PhiConfig
from phi2_jax.training.metrics import _GPU_BF16_PEAK, _GPU_MEMORY_BANDWIDTH, datasheet_value, decode_bytes_per_token


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
        if row["suite"] == "decode":
            assert 0 < row["mbu"]
    ours = [r for r in rows if r["impl"] == "phi2_jax" and r["suite"] != "convert"]
    assert all("speedup_vs_transformers" in r for r in ours)
    assert (tmp_path / "bench.json").stat().st_size > 0


def test_decode_bytes_per_token_is_every_weight_but_the_embedding_and_the_live_cache():
    from transformers import PhiConfig as HFConfig, PhiForCausalLM

    dims = dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, partial_rotary_factor=0.5)
    reference = PhiForCausalLM(HFConfig(**dims))
    weights = sum(p.numel() for name, p in reference.named_parameters() if "embed_tokens" not in name)
    ours = PhiConfig(**dims)
    batch, prompt, new = 3, 10, 5
    # k and v, 3 layers, 2 kv heads of 8 dims, float32; the cache holds 10, 11, ..., 14 positions over the 5 steps.
    cache = 2 * 3 * 2 * 8 * 4 * batch * (10 + 11 + 12 + 13 + 14) / 5
    assert decode_bytes_per_token(ours, batch, prompt, new) == weights * 4 + cache
    half = decode_bytes_per_token(ours.replace(compute_dtype="bfloat16"), batch, prompt, new)
    assert half == (weights * 4 + cache) / 2


def test_gpu_datasheet_figures_pick_the_most_specific_name():
    # "NVIDIA H100 PCIe" contains "H100" too; it must not get the SXM part's figures.
    assert datasheet_value("NVIDIA H100 PCIe", _GPU_MEMORY_BANDWIDTH) == 2.0e12
    assert datasheet_value("NVIDIA H100 PCIe", _GPU_BF16_PEAK) == 756e12
    assert datasheet_value("NVIDIA H100 80GB HBM3", _GPU_MEMORY_BANDWIDTH) == 3.35e12
    assert datasheet_value("NVIDIA H200", _GPU_MEMORY_BANDWIDTH) == 4.8e12
    assert datasheet_value("NVIDIA A100-SXM4-40GB", _GPU_MEMORY_BANDWIDTH) == 1.555e12
    assert datasheet_value("NVIDIA A100-SXM4-80GB", _GPU_MEMORY_BANDWIDTH) == 2.039e12
    assert datasheet_value("Some Accelerator", _GPU_MEMORY_BANDWIDTH) is None


def test_bench_trains_transformers_mixed_precision_against_ours(tmp_path):
    # float32 parameters with bfloat16 compute, as on a GPU: the worker trains its float32 weights under autocast.
    rows = main(["train", "--config", "nano", "--dtype", "bfloat16", "--remat", "save_dots", "--seq", "16",
                 "--batch", "2", "--repeats", "1", "--compare", "transformers", "--work-dir", str(tmp_path),
                 "--output", str(tmp_path / "bench.json")])
    assert [r["impl"] for r in rows] == ["phi2_jax", "transformers"]
    assert all(r["median_s"] > 0 and r["mfu"] > 0 for r in rows)


def test_markdown_rows_have_as_many_cells_as_the_header():
    cpu_row = {"suite": "decode", "case": "batch 1", "impl": "phi2_jax", "median_s": 1.0, "tokens_per_s": 128.0,
               "mbu": 0.5, "peak_rss_mb": 700.0, "speedup_vs_transformers": 2.0}
    for rows in ([cpu_row], [{**cpu_row, "peak_device_mb": 1234.0}, {**cpu_row, "impl": "transformers"}]):
        lines = markdown(rows).splitlines()
        assert len({line.count("|") for line in lines}) == 1, lines
    assert "peak device MB" in lines[0] and "1,234" in lines[2] and "| - |" in lines[3]


def test_post_training_suites_run_both_sides_on_the_same_work(tmp_path, capsys, monkeypatch):
    # sft and dpo against TRL at a tiny size: both sides time a step, and their first steps agree numerically.
    # The CPU's peak (3 s a measurement, twice a run) is the smoke test's above; a fixed one keeps this short.
    monkeypatch.setattr("phi2_jax.bench.suites.device_peak_flops", lambda dtype: (1e11, "fixed for the test"))
    dpo_checked = {"loss", "grad_norm", "logps/chosen", "logps/rejected"}
    for suite, checked in (("sft", {"loss", "grad_norm"}), ("dpo", dpo_checked)):
        rows = main([suite, "--config", "nano", "--seq", "16", "--batch", "2", "--repeats", "1", "--compare", "trl",
                     "--work-dir", str(tmp_path), "--output", str(tmp_path / f"{suite}.json")])
        assert [(r["suite"], r["impl"]) for r in rows] == [(suite, "phi2_jax"), (suite, "trl")]
        for row in rows:
            expected = {"case", "median_s", "tokens_per_s", "repeats", "peak_rss_mb", "mfu", "first_step_loss"}
            assert expected <= row.keys()
            assert row["median_s"] > 0 and row["tokens_per_s"] > 0 and row["repeats"] == 1
        ours, theirs = rows
        assert ours["speedup_vs_trl"] == theirs["median_s"] / ours["median_s"]
        check = ours["first_step_check"]
        assert check["agree"] and set(check) == checked | {"rtol", "agree"}, check
        assert ours["first_step_loss"] == check["loss"][0] and theirs["first_step_loss"] == check["loss"][1]
        assert f"{suite} first step: loss ours" in capsys.readouterr().out
    assert "| ours / trl |" in markdown(rows).splitlines()[0]


def test_compare_must_match_the_suite(tmp_path, capsys):
    import pytest

    for argv in (["sft", "--compare", "transformers"], ["train", "--compare", "trl"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--config", "nano", "--work-dir", str(tmp_path), "--output", str(tmp_path / "b.json")])
        assert exit_.value.code == 2
    assert ("--compare trl does not apply to suite train; expected --compare transformers (or none): sft, dpo "
            "and grpo compare with TRL's trainers, the other suites with transformers' PhiForCausalLM."
            ) in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_grpo_suite_times_both_sides_rollouts_and_steps(tmp_path, capsys):
    # grpo against TRL's GRPOTrainer at a tiny size: both sides sample and step, fixed-length completions (TRL's
    # worker asserts its count of new tokens), and both sides' loss on the same rollouts agrees.
    rows = main(["grpo", "--config", "nano", "--batch", "2", "--generations", "2", "--prompt-tokens", "8",
                 "--new-tokens", "4", "--repeats", "1", "--compare", "trl", "--work-dir", str(tmp_path),
                 "--output", str(tmp_path / "grpo.json")])
    case = "2 prompts x G 2, prompt 8 + 4 new"
    assert [(r["case"], r["impl"]) for r in rows] == [(f"{kind}: {case}", impl) for kind in ("rollout", "step")
                                                      for impl in ("phi2_jax", "trl")]
    for row in rows:
        assert {"suite", "median_s", "tokens_per_s", "repeats", "peak_rss_mb"} <= row.keys()
        assert row["suite"] == "grpo" and row["repeats"] == 1 and row["median_s"] > 0
        assert row["tokens_per_s"] == 2 * 2 * 4 / row["median_s"]  # new tokens only
    for ours, theirs in (rows[:2], rows[2:]):
        assert ours["speedup_vs_trl"] == theirs["median_s"] / ours["median_s"]
    check = rows[0]["rollout_check"]
    assert check["agree"] and set(check) == {"loss", "grad_norm", "entropy", "rtol", "agree"}, check
    assert check["grad_norm"][0] > 0  # the group-index reward gives advantages that are not all zero
    assert "grpo on the same rollouts: loss ours" in capsys.readouterr().out
