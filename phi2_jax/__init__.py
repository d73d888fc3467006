"""phi2_jax: Microsoft's Phi-2 in JAX / Flax NNX, exact to transformers' PhiForCausalLM.

Notebook API:
    import phi2_jax
    model = phi2_jax.from_pretrained("path/to/phi-2", mesh=phi2_jax.make_mesh())
    logits = model(input_ids, attention_mask)          # float32 [batch, time, vocab]
    ids = phi2_jax.generate(model, input_ids, max_new_tokens=64)
"""

from phi2_jax.config import PRESETS, PhiConfig, preset
from phi2_jax.errors import ConfigError, UserInputError, WeightsError
from phi2_jax.hf.convert import save_pretrained
from phi2_jax.inference.generate import generate, generate_text
from phi2_jax.hf.loading import from_pretrained
from phi2_jax.model.transformer import Phi, abstract_model, create_model, param_count
from phi2_jax.sharding import MeshConfig, make_mesh

__all__ = [
    "PRESETS", "PhiConfig", "preset", "ConfigError", "UserInputError", "WeightsError", "from_pretrained",
    "generate", "generate_text", "save_pretrained", "Phi", "abstract_model", "create_model", "param_count", "MeshConfig", "make_mesh",
]

