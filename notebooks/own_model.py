r"""ModalImmune on a model of your own: a Flax NNX model with a GRU encoder, through the public API.

  python notebooks/own_model.py --workdir=runs/own_model [--num_steps=300]

The contract a model meets (`modalimmune_jax.model.make_apply_fns`), for a batch of B examples
with M modalities (DESIGN.md §2):

- ``encode(batch, *, rng=None) -> z [B, M, d]``: one embedding per modality. Each modality's row
  may depend on that modality's features and ``batch["lengths"][:, m]`` only (ModalImmune's null
  embedding, the encoder's output for a zero-filled input, is computed once per length);
- ``fuse(z [B, M, d], mask [B, M], *, rng=None) -> h [B, d_h]``: the joint representation; the
  presence mask says which modalities are there (the `mask` protocol);
- ``predict(h) -> [B, C]`` logits (``[B]`` for regression, ``[B, K, 2]`` for multi-label);
- ``reconstruct(h) -> tuple of [B, D_m]``: each modality's time-pooled features.

``rng`` is a PRNG key on training passes (for dropout), None otherwise. The trainer takes the
model through ``Hooks(build_model=...)``; everything else (data, methods, checkpoints, the
evaluation) is unchanged. Here the `left` view of the bundled digits (rows of the image as
timesteps) goes through a GRU, the other two through a linear layer and a mean over time.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.configs import default
from modalimmune_jax.model import masked_mean, time_mask
from modalimmune_jax.training import Hooks, train
from modalimmune_jax.training.config import absolute_path


class GRUEncoder(nnx.Module):
    """``[B, T, D]`` and lengths ``[B]`` -> the GRU state at each example's last valid step."""

    def __init__(self, in_dim: int, d: int, *, rngs: nnx.Rngs):
        self.cell = nnx.GRUCell(in_dim, d, rngs=rngs)
        self.d = d

    def __call__(self, x, lengths):
        def step(carry, x_t):
            carry, _ = self.cell(carry, x_t)
            return carry, carry

        carry0 = jnp.zeros((x.shape[0], self.d), x.dtype)
        _, states = jax.lax.scan(step, carry0, jnp.swapaxes(x, 0, 1))  # [T, B, d]
        last = jnp.clip(lengths, 1, x.shape[1]) - 1
        return jnp.take_along_axis(jnp.swapaxes(states, 0, 1), last[:, None, None], axis=1)[:, 0]


class MeanEncoder(nnx.Module):
    """A linear layer per timestep, then the mean over valid timesteps."""

    def __init__(self, in_dim: int, d: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(in_dim, d, rngs=rngs)

    def __call__(self, x, lengths):
        if x.ndim == 2:
            x = x[:, None, :]
        return masked_mean(nnx.gelu(self.proj(x)), time_mask(lengths, x.shape[1]))


class OwnModel(nnx.Module):
    """A small fusion model of one's own: GRU for the first modality, concat fusion, MLP head."""

    def __init__(self, info, model_cfg, *, rngs: nnx.Rngs):
        self.modalities = info.modalities
        d, d_h = model_cfg.d, model_cfg.d_h
        dims = {m: info.feature_shapes[m][-1] for m in info.modalities}
        self.encoders = nnx.List(
            [GRUEncoder(dims[m], d, rngs=rngs) if i == 0 else MeanEncoder(dims[m], d, rngs=rngs)
             for i, m in enumerate(info.modalities)])
        self.fusion = nnx.Linear(len(info.modalities) * (d + 1), d_h, rngs=rngs)
        self.head = nnx.Linear(d_h, info.num_classes, rngs=rngs)
        self.decoders = nnx.List([nnx.Linear(d_h, dims[m], rngs=rngs)
                                  for m in info.modalities])

    def encode(self, batch, *, rng=None):
        del rng  # no dropout in this model
        return jnp.stack([enc(batch[m], batch["lengths"][:, i]) for i, (m, enc) in
                          enumerate(zip(self.modalities, self.encoders, strict=True))], axis=1)

    def fuse(self, z, mask, *, rng=None):
        del rng
        z = z * mask[..., None]  # an absent modality contributes nothing
        feats = jnp.concatenate([z, mask[..., None]], axis=-1)  # [B, M, d + 1]
        return nnx.gelu(self.fusion(feats.reshape(feats.shape[0], -1)))

    def predict(self, h):
        return self.head(h)

    def reconstruct(self, h):
        return tuple(dec(h) for dec in self.decoders)


def own_model_config(num_steps: int = 300):
    """The digits preset, with ModalImmune, at a size for a quick run."""
    config = default.get_config("digits")
    config.method = "modalimmune"
    config.num_steps = num_steps
    config.eval_every = config.checkpoint_every = max(num_steps // 2, 1)
    config.log_every = max(num_steps // 10, 1)
    config.model.d, config.model.d_h = 32, 64
    return config


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_steps", type=int, default=300)
    args = parser.parse_args(argv)
    outcome = train(own_model_config(args.num_steps), absolute_path(args.workdir),
                    hooks=Hooks(build_model=lambda info, cfg, rngs: OwnModel(info, cfg,
                                                                             rngs=rngs)))
    full = outcome.results["full"]["acc"]
    zero, mask = (outcome.results[k]["acc"] for k in ("missing_avg", "missing_avg_mask"))
    print(f"own model with ModalImmune: full acc {full:.4f}, missing avg {zero:.4f} (zero) / "
          f"{mask:.4f} (mask); {outcome.files['eval']}")


if __name__ == "__main__":
    main(sys.argv[1:])
