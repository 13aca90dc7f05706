"""An example of a user's own latent map for distdeer (``model.kind: custom``).

    distdeer train configs/lorenz63.yaml model.kind=custom model.factory=examples.tanh_rnn:make

A leaky tanh RNN, ``z_{t+1} = a ⊙ z + W₂ tanh(W₁ z + b₁) + h``.  It gives no Jacobians, so distdeer
differentiates ``step`` itself; ``jac`` (and ``jac_diag``) may be added to the returned dict when known in
closed form (here ``diag(a) + W₂ diag(1 − tanh²(W₁ z + b₁)) W₁``).
"""

import jax
import jax.numpy as jnp


def make(latent: int, hidden: int) -> dict:
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"a": jnp.full((latent,), 0.9),
                "W1": jax.random.normal(k1, (hidden, latent)) / jnp.sqrt(latent),
                "b1": jnp.zeros((hidden,)),
                "W2": 0.1 * jax.random.normal(k2, (latent, hidden)) / jnp.sqrt(hidden),
                "h": jnp.zeros((latent,))}

    def step(p, z):
        return p["a"] * z + p["W2"] @ jnp.tanh(p["W1"] @ z + p["b1"]) + p["h"]

    return {"init": init, "step": step}
