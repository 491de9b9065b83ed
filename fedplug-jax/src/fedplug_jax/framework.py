"""JAX, Flax and Optax, imported only after ``startup.prepare_process`` set their environment.

The backend's JAX modules import the frameworks from here, so no import order can
start JAX before its thread pool, logging and compilation cache are configured.
"""

from fedplug_jax.startup import MIN_CACHED_COMPILE_SECONDS, compilation_cache_dir, prepare_process

prepare_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx, serialization  # noqa: E402

if jax.config.jax_compilation_cache_dir is None:  # the user set none (JAX_COMPILATION_CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)

__all__ = ["jax", "jnp", "nnx", "optax", "serialization"]
