"""The gateway model: all but the routed experts (embeddings, MLA and its latent cache, dense layers, router)."""
