"""tune's compiler: a composed Hydra config in, a validated Plan out. Never imports JAX."""
