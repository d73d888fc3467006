"""Post-training splits: the DPO reference log-probs file (training/reference.py), read back when it fits and
computed again when not; the too-small validation split's warning."""

import logging

import numpy as np
import pytest

from phi2_jax.data.post_data import PostSplits, RowSource
from phi2_jax.training import reference


def _splits(n: int = 3) -> PostSplits:
    rows = {"chosen_input_ids": np.arange(n * 4).reshape(n, 4), "rejected_input_ids": np.zeros((n, 4), np.int64),
            "chosen_weights": np.ones((n, 4)), "rejected_weights": np.ones((n, 4))}
    return PostSplits([RowSource(dict(rows))], [1.0], RowSource({}), None)


@pytest.fixture
def passes(monkeypatch):
    """Stands in for the model pass: log-probs -1, -2, ... for the chosen side and counts the passes."""
    count = []

    def fake(graphdef, params, mesh, sources, batch_size):
        count.append(params)
        return [(-np.arange(1, len(s) + 1, dtype=np.float32), np.full(len(s), -9.0, np.float32)) for s in sources]

    monkeypatch.setattr(reference, "pair_logps_of_rows", fake)
    return count


def attach(run_dir, start="model A", n=3):
    splits = _splits(n)
    reference.attach_reference_logps(splits, run_dir, lambda: "params", None, None, 2, True, start=start)
    return splits.train[0].rows["ref_chosen_logps"]


def test_read_back_when_the_rows_and_model_are_the_same(tmp_path, passes):
    np.testing.assert_array_equal(attach(tmp_path), [-1, -2, -3])
    np.testing.assert_array_equal(attach(tmp_path), [-1, -2, -3])
    assert len(passes) == 1


def test_another_starting_model_computes_them_again(tmp_path, passes, caplog):
    """checkpoint.init_from changed under the same rows (a restart in the same run_dir): the old file's
    log-probs are another model's, so using them would train against the wrong reference."""
    attach(tmp_path, start="model A")
    with caplog.at_level(logging.WARNING):
        attach(tmp_path, start="model B")
    assert len(passes) == 2 and "another starting model" in caplog.text


def test_other_rows_compute_them_again_and_say_why(tmp_path, passes, caplog):
    """Fewer records under the same path: said to be other rows (was: 'cannot be read (damaged ...)')."""
    attach(tmp_path)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(attach(tmp_path, n=2), [-1, -2])
    assert len(passes) == 2 and "was computed for other rows" in caplog.text and "damaged" not in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "empty", "not npz", "missing arrays"])
def test_a_damaged_file_is_computed_again_not_a_traceback(tmp_path, passes, caplog, damage):
    attach(tmp_path)
    path = tmp_path / reference.FILE
    data = path.read_bytes()
    if damage == "missing arrays":  # the right fingerprint, no log-probs
        with np.load(path) as saved:
            np.savez(path, fingerprint=saved["fingerprint"])
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "not npz": b"hello"}[damage])
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(attach(tmp_path), [-1, -2, -3])
    assert len(passes) == 2
    assert f"{path} cannot be read (damaged or not written by phi2_jax)" in caplog.text
    assert path.read_bytes() == data  # rewritten whole


def test_a_too_small_post_training_validation_split_advises_what_applies(caplog):
    """Post-training sources refuse `split:`, so the pre-training advice (a validation token file) cannot be taken."""
    from phi2_jax.data.pipeline import validation_batches

    splits = _splits()
    splits.validation = RowSource({k: v[:2] for k, v in splits.train[0].rows.items()}, "preference pairs")
    with caplog.at_level(logging.WARNING, logger="phi2_jax.data.pipeline"):
        assert validation_batches(splits, 8, 1) == []
    assert caplog.records[0].getMessage() == (
        "the validation split holds 2 preference pairs, fewer than one batch of 8 preference pairs, so no validation "
        "loss will be reported; raise data.val_fraction (post-training holds out that share of its records).")
