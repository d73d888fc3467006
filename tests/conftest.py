"""Shared test setup: 8 fake CPU devices, exact float32 matmuls, and reference Hugging Face folders."""

import os

# Must happen before jax is imported anywhere: 8 fake CPU devices for mesh tests.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """Factory: hf_folder(name, dialect=..., layout=..., **PhiConfig kwargs) -> (folder, torch model); cached per name."""
    cache = {}

    def make(name, **kwargs):
        if name not in cache:
            from tests import hf_reference  # torch and transformers: only where a test needs them

            cache[name] = hf_reference.write_hf_folder(tmp_path_factory.mktemp(name), **kwargs)
        return cache[name]

    return make
