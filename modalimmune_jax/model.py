"""The multimodal fusion model (DESIGN.md §2), written in Flax NNX and applied as pure functions.

Per-modality encoders ``E_m`` map ``x_m`` (``[B, T_m, D_m]`` or ``[B, D_m]``) to ``z_m`` ``[B, d]``;
the fusion ``F`` maps the stacked ``z`` ``[B, M, d]`` and the presence mask ``[B, M]`` to the joint
``h`` ``[B, d_h]``; a head gives predictions; per-modality decoders ``D_m(h)`` reconstruct the
time-pooled features of every modality (§3.5).

The NNX module is split once (``nnx.split``) into a ``graphdef`` and a params pytree. Everything
downstream uses the pure functions returned by :func:`make_apply_fns`, which take the params pytree:
HVPs, hypergradients, sharding and checkpoints all see plain pytrees.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from modalimmune_jax.spectral import is_static_zero, spectral_collapse

ENCODERS = ("mlp", "conv", "transformer")
FUSIONS = ("concat", "attention")
TASKS = ("classification", "regression", "multilabel")


def _time_mask(lengths: jax.Array, num_steps: int) -> jax.Array:
    """``[B]`` int lengths -> ``[B, T]`` float32 validity mask (at least one valid step)."""
    lengths = jnp.maximum(lengths, 1)
    return (jnp.arange(num_steps)[None, :] < lengths[:, None]).astype(jnp.float32)


def masked_mean(x: jax.Array, time_mask: jax.Array) -> jax.Array:
    """Mean over valid timesteps: ``[B, T, D]`` and ``[B, T]`` -> ``[B, D]``."""
    w = time_mask[..., None]
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


class Encoder(nnx.Module):
    """One modality's encoder: ``[B, T, D]`` (or ``[B, D]``) and lengths ``[B]`` -> ``[B, d]``."""

    def __init__(self, kind: str, in_dim: int, max_len: int, d: int, *, num_heads: int,
                 rngs: nnx.Rngs):
        if kind not in ENCODERS:
            raise ValueError(f"model.encoder: unknown encoder {kind!r}; expected one of {ENCODERS}")
        self.kind = kind
        self.proj = nnx.Linear(in_dim, d, rngs=rngs)
        # Learned positions: mean pooling alone would throw away *where* a pattern occurs (a digit's
        # rows, a word's place in the utterance).
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d)))
        if kind == "conv":
            # Kernel 3 over time: local temporal patterns (MulT-style 1-D conv front end).
            self.conv = nnx.Conv(d, d, kernel_size=(3,), padding="SAME", rngs=rngs)
        elif kind == "transformer":
            self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d, qkv_features=d,
                                               decode=False, rngs=rngs)
            self.norm1 = nnx.LayerNorm(d, rngs=rngs)
            self.norm2 = nnx.LayerNorm(d, rngs=rngs)
            self.ff = nnx.Linear(d, d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        if x.ndim == 2:  # a vector modality is a length-1 sequence
            x = x[:, None, :]
        tmask = _time_mask(lengths, x.shape[1])  # [B, T]
        y = nnx.gelu(self.proj(x) + self.pos[None, : x.shape[1]])  # [B, T, d]
        if self.kind == "conv":
            y = nnx.gelu(self.conv(y * tmask[..., None]))
        elif self.kind == "transformer":
            attn_mask = nnx.make_attention_mask(tmask, tmask)  # [B, 1, T, T]
            y = self.norm1(y + self.attn(y, mask=attn_mask, deterministic=True))
            y = self.norm2(y + nnx.gelu(self.ff(y)))
        return self.out(masked_mean(y, tmask))


class Fusion(nnx.Module):
    """``z`` ``[B, M, d]`` and presence mask ``[B, M]`` -> joint ``h`` ``[B, d_h]``."""

    def __init__(self, kind: str, num_modalities: int, d: int, d_h: int, *, num_heads: int,
                 rngs: nnx.Rngs):
        if kind not in FUSIONS:
            raise ValueError(f"model.fusion: unknown fusion {kind!r}; expected one of {FUSIONS}")
        self.kind = kind
        if kind == "concat":
            self.hidden = nnx.Linear(num_modalities * (d + 1), d_h, rngs=rngs)
        else:
            self.modality_emb = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                                   (num_modalities, d)))
            self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d, qkv_features=d,
                                               decode=False, rngs=rngs)
            self.norm = nnx.LayerNorm(d, rngs=rngs)
            self.hidden = nnx.Linear(d, d_h, rngs=rngs)
        self.out = nnx.Linear(d_h, d_h, rngs=rngs)

    def __call__(self, z: jax.Array, mask: jax.Array) -> jax.Array:
        # A modality flagged absent contributes nothing (the `mask` protocol tells the model).
        z = z * mask[..., None]
        if self.kind == "concat":
            feats = jnp.concatenate([z, mask[..., None]], axis=-1)  # [B, M, d+1]
            y = nnx.gelu(self.hidden(feats.reshape(feats.shape[0], -1)))  # -> [B, M*(d+1)]
        else:
            tokens = z + self.modality_emb[None]
            attn_mask = nnx.make_attention_mask(mask, mask)  # [B, 1, M, M]
            tokens = self.norm(tokens + self.attn(tokens, mask=attn_mask, deterministic=True))
            y = nnx.gelu(self.hidden(masked_mean(tokens, mask)))
        return nnx.gelu(self.out(y))


class FusionModel(nnx.Module):
    """Encoders, fusion, task head and reconstruction decoders (DESIGN.md §2, §3.5)."""

    def __init__(self, *, modalities: Sequence[str], feature_shapes: Mapping[str, tuple],
                 task: str, num_classes: int, encoder: str = "mlp", fusion: str = "concat",
                 d: int = 64, d_h: int = 128, num_heads: int = 4, rngs: nnx.Rngs):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.modalities = tuple(modalities)
        self.task = task
        self.num_classes = num_classes
        self.encoders = nnx.List([
            Encoder(encoder, feature_shapes[m][-1],
                    feature_shapes[m][0] if len(feature_shapes[m]) == 2 else 1, d,
                    num_heads=num_heads, rngs=rngs)
            for m in self.modalities
        ])
        self.fusion = Fusion(fusion, len(self.modalities), d, d_h, num_heads=num_heads, rngs=rngs)
        out_dim = {"classification": num_classes, "regression": 1, "multilabel": 2 * num_classes}
        self.head = nnx.Linear(d_h, out_dim[task], rngs=rngs)
        self.decoders = nnx.List([
            nnx.Linear(d_h, feature_shapes[m][-1], rngs=rngs) for m in self.modalities
        ])

    def encode(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """-> ``z`` ``[B, M, d]``."""
        lengths = batch["lengths"]  # [B, M]
        return jnp.stack(
            [enc(batch[m], lengths[:, i]) for i, (m, enc) in
             enumerate(zip(self.modalities, self.encoders))], axis=1)

    def fuse(self, z: jax.Array, mask: jax.Array) -> jax.Array:
        """-> ``h`` ``[B, d_h]``."""
        return self.fusion(z, mask)

    def predict(self, h: jax.Array) -> jax.Array:
        """-> ``[B, C]`` logits, ``[B]`` regression outputs, or ``[B, K, 2]`` multilabel logits."""
        y = self.head(h)
        if self.task == "regression":
            return y[:, 0]
        if self.task == "multilabel":
            return y.reshape(y.shape[0], self.num_classes, 2)
        return y

    def reconstruct(self, h: jax.Array) -> tuple[jax.Array, ...]:
        """-> one ``[B, D_m]`` time-pooled feature reconstruction per modality."""
        return tuple(dec(h) for dec in self.decoders)


class ApplyFns(NamedTuple):
    """Pure functions of the params pytree, closed over the model's graphdef."""

    encode: Any  # (params, batch) -> z [B, M, d]
    head: Any  # (params, z, mask) -> (h [B, d_h], predictions)
    reconstruct: Any  # (params, h) -> tuple of [B, D_m]
    apply: Any  # (params, batch, *, rng=None, interventions=None) -> dict


def make_apply_fns(graphdef: nnx.GraphDef, collapse_fn=None) -> ApplyFns:
    """Builds the pure apply functions for a split :class:`FusionModel`.

    Args:
      graphdef: from ``nnx.split(model, nnx.Param)``.
      collapse_fn: ``(Z [B, d], strength, gamma) -> [B, d]``, the collapse operator applied to the
        target modality's embedding when ``interventions["target"]`` is given (DESIGN.md §3.2).

    Returns:
      :class:`ApplyFns`. ``apply(params, batch, *, rng=None, interventions=None)`` returns a dict with
      ``z`` ``[B, M, d]`` (after any intervention), ``h`` ``[B, d_h]``, ``preds`` (task-shaped) and
      ``recon`` (tuple of ``[B, D_m]``). ``interventions`` may hold ``target`` ``[M]`` float (one-hot,
      all-zero for a clean step), ``strength`` and ``gamma`` scalars.
    """

    def encode(params, batch):
        return nnx.merge(graphdef, params).encode(batch)

    def head(params, z, mask):
        model = nnx.merge(graphdef, params)
        h = model.fuse(z, mask)
        return h, model.predict(h)

    def reconstruct(params, h):
        return nnx.merge(graphdef, params).reconstruct(h)

    def apply(params, batch, *, rng=None, interventions=None):
        del rng  # The model is deterministic; the argument keeps the DESIGN.md §2 signature.
        z = encode(params, batch)
        if interventions is not None and "target" in interventions:
            z = collapse_target(z, interventions["target"], interventions["strength"],
                                interventions["gamma"], collapse_fn=collapse_fn)
        h, preds = head(params, z, batch["mask"])
        return {"z": z, "h": h, "preds": preds, "recon": reconstruct(params, h)}

    return ApplyFns(encode=encode, head=head, reconstruct=reconstruct, apply=apply)


def collapse_target(z: jax.Array, target: jax.Array, strength, gamma, *, collapse_fn,
                    null: jax.Array | None = None) -> jax.Array:
    """Applies ``collapse_fn`` to each modality picked by the multi-hot ``target``.

    The modalities go through a `lax.map`, one ``[B, d]`` SVD at a time. A batched (vmapped) SVD
    deadlocked XLA:CPU on 2 cores: LAPACK's batch loop blocks a worker of the intra-op pool while
    waiting for chunks queued on that same pool, and two such SVDs in flight took both workers.
    `spectral.spectral_collapse` with a static ``gamma = 0`` has no SVD (its closed form), so it is
    vmapped instead: with the null anchor the target becomes ``(1 - strength) z + strength null``.

    Args:
      z: ``[B, M, d]`` embeddings.
      target: ``[M]`` float multi-hot (one-hot for one target; all zeros: no change), or
        ``[B, M]`` for targets per example (the collapse itself is always a batch statistic).
      strength, gamma: scalars forwarded to ``collapse_fn``.
      collapse_fn: ``(Z [B, d], strength, gamma) -> [B, d]``.
      null: optional ``[B, M, d]`` embeddings of the zero-filled input. When given, a collapsed
        modality's centre also moves from its batch mean towards its null embedding by
        ``strength``, so a full collapse lands where a missing modality lands (README,
        "Formulation changes").

    Returns:
      ``[B, M, d]``: ``z`` with the targets' embeddings replaced by their collapse.
    """
    if collapse_fn is None:
        raise ValueError("interventions['target'] needs a collapse_fn (make_apply_fns)")
    zm = jnp.moveaxis(z, 1, 0)  # [M, B, d]
    if collapse_fn is spectral_collapse and is_static_zero(gamma):
        collapsed = jax.vmap(collapse_fn, in_axes=(0, None, None))(zm, strength, gamma)
    else:
        collapsed = jax.lax.map(lambda x: collapse_fn(x, strength, gamma), zm)
    if null is not None:
        collapsed = collapsed + strength * (jnp.moveaxis(null, 1, 0)
                                            - jnp.mean(zm, axis=1, keepdims=True))
    t = jnp.broadcast_to(target.astype(z.dtype), z.shape[:2])[:, :, None]
    return z + t * (jnp.moveaxis(collapsed, 0, 1) - z)


def create_model(info, model_cfg, *, rngs: nnx.Rngs) -> FusionModel:
    """Builds a :class:`FusionModel` from a ``DatasetInfo`` and the ``config.model`` block."""
    return FusionModel(modalities=info.modalities, feature_shapes=info.feature_shapes,
                       task=info.task, num_classes=info.num_classes, encoder=model_cfg.encoder,
                       fusion=model_cfg.fusion, d=model_cfg.d, d_h=model_cfg.d_h,
                       num_heads=model_cfg.num_heads, rngs=rngs)
