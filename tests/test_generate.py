"""KV-cache generation against transformers' generate, against recomputation, and its sampling controls."""

import sys

import numpy as np
import pytest
import torch

import phi2_jax
from phi2_jax import UserInputError
from phi2_jax.inference.cli import main
from phi2_jax.inference.decoding import can_fuse_input_projections, layer_copy_fits
from phi2_jax.inference.generate import Sampling, generate, generate_text, sample_logits
from phi2_jax.inference.greedy import greedy_complete
from tests.hf_reference import train_bpe_tokenizer

GEN = dict(dialect="5.x", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, partial_rotary_factor=0.5, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def gen_model(hf_folder):
    folder, reference = hf_folder("generate", **GEN)
    return folder, reference, phi2_jax.from_pretrained(folder)


def hf_greedy(reference, ids, mask, new):
    with torch.no_grad():
        return reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None).numpy()


@pytest.mark.parametrize("copy_layers", [True, False], ids=["layer-copies", "stacked-scan"])
def test_greedy_equals_transformers_for_one_prompt(gen_model, copy_layers):
    _, reference, model = gen_model
    ids = np.array([[11, 12, 13, 14, 15, 16]])
    ours = generate(model, ids, max_new_tokens=16, eos_token_id=-1, copy_layers=copy_layers)
    np.testing.assert_array_equal(ours, hf_greedy(reference, ids, np.ones_like(ids), 16))


def test_layer_copies_are_made_only_when_they_take_at_most_half_the_free_memory(gen_model, monkeypatch):
    _, reference, model = gen_model
    layer_bytes = 4 * sum(p.numel() for p in reference.model.layers.parameters())  # float32 weights
    for free, expected in [(2 * layer_bytes, True), (2 * layer_bytes - 1, False), (0, False)]:
        monkeypatch.setattr(sys.modules["phi2_jax.inference.decoding"], "free_device_memory", lambda free=free: free)
        assert layer_copy_fits(model) is expected


def test_greedy_equals_transformers_for_a_left_padded_batch(gen_model):
    _, reference, model = gen_model
    rng = np.random.default_rng(0)
    lengths = [7, 3, 5]
    ids = np.zeros((3, 7), np.int64)
    mask = np.zeros((3, 7), np.int64)
    for r, n in enumerate(lengths):
        ids[r, 7 - n:] = rng.integers(1, 320, n)
        mask[r, 7 - n:] = 1
    ours = generate(model, ids, mask, max_new_tokens=12, eos_token_id=-1)
    np.testing.assert_array_equal(ours, hf_greedy(reference, ids, mask, 12))


def test_cached_decoding_equals_recomputing_every_step(gen_model):
    _, _, model = gen_model
    prompt = [21, 22, 23, 24, 25]
    cached = generate(model, np.array([prompt]), max_new_tokens=20, eos_token_id=-1)[0, 5:]
    recomputed = greedy_complete(model, prompt, 20, eos_id=-1)
    np.testing.assert_array_equal(cached, recomputed)


def test_rows_stop_at_eos_and_at_stop_sequences(gen_model):
    _, _, model = gen_model
    ids = np.array([[31, 32, 33, 34], [41, 42, 43, 44]])
    free = generate(model, ids, max_new_tokens=10, eos_token_id=-1)
    eos = int(free[0, 6])  # make row 0's third new token the EOS
    out = generate(model, ids, max_new_tokens=10, eos_token_id=eos)
    assert list(out[0, 4:7]) == list(free[0, 4:7]) and all(out[0, 7:] == eos)  # padded with EOS after it
    stop = [int(free[1, 5]), int(free[1, 6])]  # row 1 stops after these two tokens
    out = generate(model, ids, max_new_tokens=10, eos_token_id=-1, stop_sequences=[stop])
    np.testing.assert_array_equal(out[1, :7], free[1, :7])
    assert all(out[1, 7:] == -1)  # padded with the EOS id (-1 here) after the stop


def test_streaming_sees_every_token_in_order(gen_model):
    _, _, model = gen_model
    seen = []
    out = generate(model, np.array([[51, 52, 53]]), max_new_tokens=8, eos_token_id=-1,
                   on_token=lambda step, tokens: seen.append((step, int(tokens[0]))))
    assert [s for s, _ in seen] == list(range(8)) and [t for _, t in seen] == list(out[0, 3:])


def test_sampling_is_seeded_and_top_k_one_is_greedy(gen_model):
    _, _, model = gen_model
    ids = np.array([[61, 62, 63]])
    a = generate(model, ids, max_new_tokens=12, temperature=1.0, seed=5, eos_token_id=-1)
    b = generate(model, ids, max_new_tokens=12, temperature=1.0, seed=5, eos_token_id=-1)
    c = generate(model, ids, max_new_tokens=12, temperature=1.0, seed=6, eos_token_id=-1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, ids, max_new_tokens=12, eos_token_id=-1)
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=12, temperature=0.7, top_k=1, eos_token_id=-1),
                                  greedy)


def test_top_p_samples_from_the_nucleus_in_proportion():
    import jax
    import jax.numpy as jnp
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20_000, 1)), jnp.float32))
    tokens = np.asarray(sample_logits(logits, jax.random.key(0), Sampling(temperature=1.0, top_p=0.8),
                                      jnp.zeros((20_000, 4), bool)))
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)  # 0.5 + 0.3 reaches 0.8


def test_repetition_penalty_matches_transformers_processor():
    import jax.numpy as jnp
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = np.random.default_rng(0).normal(size=(2, 10)).astype(np.float32)
    context = np.array([[1, 3, 3], [0, 9, 2]])
    seen = np.zeros((2, 10), bool)
    for r, row in enumerate(context):
        seen[r, row] = True
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(context), torch.tensor(logits)).numpy()
    ours = sample_logits(jnp.asarray(logits), None, Sampling(repetition_penalty=1.7, temperature=0.0), jnp.asarray(seen))
    np.testing.assert_array_equal(np.asarray(ours), expected.argmax(-1))
    penalised = np.where(seen, np.where(logits > 0, logits / 1.7, logits * 1.7), logits)
    np.testing.assert_allclose(penalised, expected, rtol=1e-6)


def test_bad_prompts_get_one_sentence(gen_model):
    _, _, model = gen_model
    with pytest.raises(UserInputError, match=r"a prompt of 120 tokens plus max_new_tokens 20 exceeds the model's context of 128"):
        generate(_short_context(model), np.ones((1, 120), int), max_new_tokens=20)
    with pytest.raises(UserInputError, match=r"input_ids must be a non-empty \[batch, time\] array"):
        generate(model, np.zeros((1, 0), int))
    with pytest.raises(UserInputError, match=r"prompt 1 of the batch is empty"):
        generate(model, np.ones((2, 3), int), np.array([[1, 1, 1], [0, 0, 0]]))


def _short_context(model):
    """The same weights with a 128-token context (the test model's is 2048)."""
    from flax import nnx
    _, state = nnx.split(model)
    short_graphdef, _ = nnx.split(phi2_jax.abstract_model(model.config.replace(max_position_embeddings=128)))
    return nnx.merge(short_graphdef, state)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_bpe_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, 300, tmp_path_factory.mktemp("tok"))


def test_text_helper_and_cli_stream_the_same_text(gen_model, tokenizer_dir, capsys):
    folder, _, model = gen_model
    from phi2_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    texts = generate_text(model, tok, ["def add(a, b):", "return"], max_new_tokens=12)
    main(["--model", str(folder), "--tokenizer", str(tokenizer_dir), "--prompt", "def add(a, b):",
          "--max-new-tokens", "12"])
    assert capsys.readouterr().out == "def add(a, b):" + texts[0] + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(folder), "--tokenizer", str(tokenizer_dir)])
    assert exit_info.value.code == 2
    assert "no prompt given; pass --prompt TEXT or --prompt-file FILE." in capsys.readouterr().err


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 4, "tensor": 1}],
                         ids=["tensor-parallel", "fsdp-fused-projections"])
def test_generation_on_a_sharded_model_matches_one_device(gen_model, axes):
    folder, _, model = gen_model
    sharded = phi2_jax.from_pretrained(folder, mesh=phi2_jax.make_mesh(axes))
    assert can_fuse_input_projections(sharded) == (axes["tensor"] == 1)
    ids = np.random.default_rng(7).integers(1, 320, (4, 6))
    np.testing.assert_array_equal(generate(sharded, ids, max_new_tokens=10, eos_token_id=-1),
                                  generate(model, ids, max_new_tokens=10, eos_token_id=-1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be a positive integer, got 0."),
    (dict(top_k=2.5), "top_k must be a positive integer, got 2.5."),
    (dict(temperature=-0.5), "temperature must be a number at least 0 (0: greedy), got -0.5."),
    (dict(temperature=float("nan")), "temperature must be a number at least 0 (0: greedy), got nan."),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5."),
    (dict(top_p=float("nan")), "top_p must be in (0, 1], got nan."),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a positive number, got 0.0."),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be a positive number, got -1.0."),
])
def test_bad_sampling_values_are_refused_by_the_python_api(gen_model, kwargs, message):
    _, _, model = gen_model
    with pytest.raises(UserInputError) as error:
        Sampling(**kwargs)
    assert str(error.value) == message
    with pytest.raises(UserInputError) as error:
        generate(model, np.array([[1, 2, 3]]), max_new_tokens=2, **kwargs)
    assert str(error.value) == message


def test_top_k_above_the_vocabulary_is_refused(gen_model):
    _, _, model = gen_model
    with pytest.raises(UserInputError) as error:
        generate(model, np.array([[1, 2, 3]]), max_new_tokens=2, temperature=1.0, top_k=321)
    assert str(error.value) == "top_k 321 exceeds the model's vocabulary of 320 tokens."
    generate(model, np.array([[1, 2, 3]]), max_new_tokens=2, temperature=1.0, top_k=320)  # the whole vocabulary is fine


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k must be a positive integer, got 0."),
    (["--temperature", "-1"], "--temperature must be a number at least 0 (0: greedy), got -1.0."),
    (["--temperature", "nan"], "--temperature must be a number at least 0 (0: greedy), got nan."),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0."),
    (["--top-p", "1.01"], "--top-p must be in (0, 1], got 1.01."),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a positive number, got 0.0."),
], ids=["top-k-0", "temperature-negative", "temperature-nan", "top-p-0", "top-p-above-1", "penalty-0"])
def test_cli_refuses_bad_sampling_flags_before_loading_the_model(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:  # the model does not exist: nothing was loaded
        main(["--model", str(tmp_path / "no-model"), "--prompt", "def f():", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_cli_refuses_top_k_above_the_vocabulary_and_a_non_utf8_prompt_file(gen_model, tokenizer_dir, tmp_path, capsys):
    folder, _, _ = gen_model
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(folder), "--tokenizer", str(tokenizer_dir), "--prompt", "def", "--top-k", "321"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --top-k 321 exceeds the model's vocabulary of 320 tokens.\n"
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("def café():\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(folder), "--prompt-file", str(latin1)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: --prompt-file {latin1} is not UTF-8 text (invalid continuation byte "
                                       f"at byte 7); expected UTF-8.\n")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A sentencepiece tokenizer trained here the way the default training run trains its own (BPE, byte
    fallback, a dummy prefix space), with 300 pieces so that its ids fit the 320-token test model."""
    from phi2_jax.data.tokenizer import train_sentencepiece
    corpus = ["from os import path, sep\n", "import sys\nfrom collections import deque\n",
              "def add(a, b):\n    return a + b\n", "x = [i for i in range(10)]\n", "print('héllo wörld')\n"] * 30
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PHI2_JAX_CACHE", str(tmp_path_factory.mktemp("sp_cache")))
        return train_sentencepiece(lambda: corpus, 300, "stream-test")


@pytest.mark.parametrize("prompt, whole, stop", [
    ("from os import", "from os import path, sep", []),           # the continuation begins with '▁path'
    ("from os import", "from os import path, sep", [", "]),       # cut at a stop string that arrives in two pieces
    ("print(", "print('€ and ✓')", []),                           # byte-fallback pieces, 3 per character
], ids=["leading-space", "stop-string", "multi-byte"])
def test_streamed_text_equals_decoding_prompt_and_continuation_together(gen_model, sentencepiece_model, capsys,
                                                                        monkeypatch, prompt, whole, stop):
    folder, _, _ = gen_model
    from phi2_jax.data.tokenizer import load_tokenizer
    from phi2_jax.inference import cli
    tok = load_tokenizer(sentencepiece_model)
    ids, all_ids = tok.encode(prompt), tok.encode(whole)
    assert all_ids[:len(ids)] == ids
    new = all_ids[len(ids):]
    if prompt == "from os import":
        assert tok.decode(new) == whole[len(prompt) + 1:]  # decoding the continuation alone loses its space
    else:
        assert "\ufffd" in tok.decode(new[:2])  # the first bytes of '€' alone are not a character yet

    def scripted(model, input_ids, *, max_new_tokens, eos_token_id, stop_sequences, on_token, **sampling):
        for step, token in enumerate(new + [eos_token_id]):
            on_token(step, np.array([token]))

    monkeypatch.setattr(cli, "generate", scripted)
    main(["--model", str(folder), "--tokenizer", str(sentencepiece_model), "--prompt", prompt,
          *[a for s in stop for a in ("--stop", s)]])
    expected = whole if not stop else whole[:whole.index(stop[0], len(prompt))]
    assert capsys.readouterr().out == expected + "\n"


def test_streamed_model_output_equals_the_full_decode(gen_model, sentencepiece_model, capsys):
    folder, _, model = gen_model
    from phi2_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(sentencepiece_model)
    prompt = "from os import"
    ids = tok.encode(prompt)
    new = generate(model, np.array([ids]), max_new_tokens=12, eos_token_id=tok.eos_id)[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    main(["--model", str(folder), "--tokenizer", str(sentencepiece_model), "--prompt", prompt,
          "--max-new-tokens", "12"])
    assert capsys.readouterr().out == prompt + tok.decode(ids + new)[len(tok.decode(ids)):] + "\n"
