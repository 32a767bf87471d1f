"""rsst-jax: structurally sparse lottery tickets (IMP, Refill, RSST) in JAX/Flax/Optax."""
