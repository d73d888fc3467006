"""The streaming Orbax writer/reader: several chunks per leaf, both memory orders, restored by Orbax itself."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from phi2_jax.checkpoint.orbax_stream import ParamReader, ParamWriter


def test_chunked_leaves_in_both_orders_restore_exactly_in_orbax_and_in_the_reader(tmp_path):
    rng = np.random.default_rng(0)
    hf_kernel = rng.standard_normal((24, 16)).astype(np.float16)  # [out, in], row-major, as in a safetensors file
    leaves = {
        "kernel": (hf_kernel.T, np.float16),  # our [in, out] view: Fortran order on disk
        "widened": (hf_kernel.T, np.float32),
        "narrowed": (rng.standard_normal((16, 24)).astype(np.float32).T, ml_dtypes.bfloat16),
        "rows": (rng.standard_normal((24, 8)).astype(np.float32), np.float32),  # C order
        "bias": (rng.standard_normal(10).astype(np.float32), np.float32),
        "scalar": (np.float32(3.5), np.float32),
    }
    writer = ParamWriter(tmp_path / "params", chunk_bytes=100)  # a few rows / columns per chunk
    for name, (array, dtype) in leaves.items():
        writer.write((name,), array, dtype)
    writer.close()
    expected = {name: np.asarray(array).astype(dtype) for name, (array, dtype) in leaves.items()}

    reader = ParamReader(tmp_path / "params")
    for name, value in expected.items():
        read = reader.read((name,))
        assert read.dtype == value.dtype and read.shape == value.shape, name
        np.testing.assert_array_equal(read, value, err_msg=name)
    assert reader.read(("kernel",)).T.flags.c_contiguous  # back to the Hugging Face layout without a copy

    mesh = jax.make_mesh((2, 4), ("a", "b"))
    specs = {"kernel": PartitionSpec("a", "b"), "widened": PartitionSpec("b", None),
             "narrowed": PartitionSpec(None, "a"), "rows": PartitionSpec("b"), "bias": PartitionSpec(),
             "scalar": PartitionSpec()}
    target = {name: jax.ShapeDtypeStruct(value.shape, jnp.float32, sharding=NamedSharding(mesh, specs[name]))
              for name, value in expected.items()}
    restored = ocp.StandardCheckpointer().restore((tmp_path / "params").absolute(), target)
    for name, value in expected.items():
        assert restored[name].sharding.spec == specs[name]
        np.testing.assert_array_equal(np.asarray(restored[name]), value.astype(np.float32), err_msg=name)
