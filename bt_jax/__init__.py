"""bt_jax: Barlow Twins (Zbontar et al., 2021) in JAX/Flax for TPU pods and GPU clusters."""

__version__ = "0.1.0"
