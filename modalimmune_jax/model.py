"""The multimodal fusion model (DESIGN.md §2), written in Flax NNX and applied as pure functions.

Per-modality encoders ``E_m`` map ``x_m`` (``[B, T_m, D_m]`` or ``[B, D_m]``) to ``z_m`` ``[B, d]``;
the fusion ``F`` maps the stacked ``z`` ``[B, M, d]`` and the presence mask ``[B, M]`` to the joint
``h`` ``[B, d_h]``; a head gives predictions; per-modality decoders ``D_m(h)`` reconstruct the
time-pooled features of every modality (§3.5). Each decoder is a linear map in units of its
targets' train statistics, ``D_m(h) = mu_m + sigma_m * (W_m h + b_m)``, so its output starts at the
targets' scale whatever the features' units, and the scale-free reconstruction loss
(``losses.reconstruction_loss``) starts near 1 per modality instead of at ``1 / sigma^2``.

The NNX module is split once (``nnx.split``) into a ``graphdef`` and a params pytree. Everything
downstream uses the pure functions returned by :func:`make_apply_fns`, which take the params pytree:
HVPs, hypergradients, sharding and checkpoints all see plain pytrees.

Regularization for small real datasets (issue 14), both off by default in the module:

- ``dropout``: inverted dropout on each encoder's output ``z_m`` and on the joint ``h``. It is
  active only when the pure functions get an ``rng`` key; without one (evaluation, the
  information-gain passes, every caller that predates it) the model is deterministic.
- ``input_norm``: a LayerNorm over each modality's feature axis before its encoder, so a view's
  units cannot set the scale of its first layer. LayerNorm maps an all-zero row to its bias
  ``beta`` exactly (``(0 - 0) / sqrt(0 + eps) = 0``; no NaN), so a zero-filled (removed)
  modality still maps every example to one fixed embedding (given its lengths), as it does
  without the norm. A modality with a single feature skips it: over one feature LayerNorm would
  map every input to ``beta`` and erase the modality. Scale-free only down to a per-row variance
  of ~1e-4: below that LayerNorm's epsilon (1e-6) shrinks the output (``dataset.normalize`` has
  no such floor).
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modalimmune_jax.spectral import is_static_zero, spectral_collapse

ENCODERS = ("mlp", "conv", "transformer")
FUSIONS = ("concat", "attention")
TASKS = ("classification", "regression", "multilabel")


# A pooled feature whose train variance is below this fraction of its modality's mean variance is
# treated as having that much: a (near-)constant feature is fitted exactly by the decoder's bias,
# and dividing its leftover rounding error by ~0 would swamp the loss instead.
VARIANCE_FLOOR = 1e-6


def reconstruction_stats(info) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per modality ``(mean [D_m], variance [D_m])`` float64 of the reconstruction targets.

    From ``info.pooled_mean`` / ``info.pooled_variance`` (the stored train split's time-pooled
    features, data_pipelines/normalization.py), the variance floored at ``VARIANCE_FLOOR`` times
    its modality's mean variance: relative, so still scale-free. A modality whose pooled features
    are all constant, and a hand-made info without statistics (tests, toys), get mean 0 and
    variance 1 (the raw squared error).
    """
    out = {}
    for m in info.modalities:
        d = info.feature_shapes[m][-1]
        var = getattr(info, "pooled_variance", {}).get(m)
        mean = getattr(info, "pooled_mean", {}).get(m)
        mean = np.zeros(d) if mean is None else np.asarray(mean, np.float64)
        var = np.ones(d) if var is None else np.asarray(var, np.float64)
        floor = VARIANCE_FLOOR * var.mean()
        out[m] = (mean, np.maximum(var, floor) if floor > 0 else np.ones(d))
    return out


def time_mask(lengths: jax.Array, num_steps: int) -> jax.Array:
    """``[B]`` int lengths -> ``[B, T]`` float32 validity mask (at least one valid step)."""
    lengths = jnp.maximum(lengths, 1)
    return (jnp.arange(num_steps)[None, :] < lengths[:, None]).astype(jnp.float32)


def masked_mean(x: jax.Array, time_mask: jax.Array) -> jax.Array:
    """Mean over valid timesteps: ``[B, T, D]`` and ``[B, T]`` -> ``[B, D]``."""
    w = time_mask[..., None]
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each entry with probability `rate`, scale the rest by 1/(1-rate).

    Identity when ``key`` is None or ``rate`` is 0 (a static Python float), so deterministic
    callers pay nothing and draw nothing.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def temporal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``nnx.Conv``'s 'SAME' 1-D convolution, as one matmul over stacked shifted copies.

    XLA:CPU runs the kernel gradient of ``lax.conv`` about 10x slower inside a loop (the HVP
    scans of Hutchinson, Lanczos and Neumann) than outside one (issue 15: 38 ms against 3 ms per
    HVP); the matmul form has no such cliff, and the same params and values.

    Args:
      x: ``[B, T, d_in]``.
      kernel: ``[k, d_in, d_out]`` (``nnx.Conv``'s layout), ``k`` odd.
      bias: ``[d_out]`` or None.

    Returns:
      ``[B, T, d_out]``, ``x``'s dtype.
    """
    width, steps = kernel.shape[0], x.shape[1]
    half = width // 2
    padded = jnp.pad(x, ((0, 0), (half, width - 1 - half), (0, 0)))
    stacked = jnp.concatenate([padded[:, k:k + steps] for k in range(width)], axis=-1)
    y = stacked @ kernel.reshape(-1, kernel.shape[-1])
    return y if bias is None else y + bias


class TemporalConv(nnx.Conv):
    """``nnx.Conv`` (same params, same 'SAME' 1-D convolution) computed by `temporal_conv`.

    A subclass rather than a bare function call, so that the layer's output is still a module
    call (MANU's activation capture, `methods.unlearning.encoder_layer_activations`, reads it).
    Only ``padding="SAME"``, stride 1, no dilation or groups: what the conv encoder uses.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ones = (None, 1, (1,))
        if (self.padding != "SAME" or self.strides not in ones or self.input_dilation not in ones
                or self.kernel_dilation not in ones or self.feature_group_count != 1
                or self.kernel_size[0] % 2 == 0):
            raise ValueError("TemporalConv: only an odd kernel, padding='SAME', stride 1, no "
                             "dilation and no groups")

    def __call__(self, inputs: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias.value
        return temporal_conv(inputs, self.kernel.value, bias)


class Encoder(nnx.Module):
    """One modality's encoder: ``[B, T, D]`` (or ``[B, D]``) and lengths ``[B]`` -> ``[B, d]``."""

    def __init__(self, kind: str, in_dim: int, max_len: int, d: int, *, num_heads: int,
                 input_norm: bool = False, dropout: float = 0.0, rngs: nnx.Rngs):
        if kind not in ENCODERS:
            raise ValueError(f"model.encoder: unknown encoder {kind!r}; expected one of {ENCODERS}")
        self.kind = kind
        self.dropout_rate = dropout
        # Over a single feature LayerNorm is constant (module docstring): skipped there.
        self.in_norm = nnx.LayerNorm(in_dim, rngs=rngs) if input_norm and in_dim > 1 else None
        self.proj = nnx.Linear(in_dim, d, rngs=rngs)
        # Learned positions: mean pooling alone would throw away *where* a pattern occurs (a digit's
        # rows, a word's place in the utterance).
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d)))
        if kind == "conv":
            # Kernel 3 over time: local temporal patterns (MulT-style 1-D conv front end).
            self.conv = TemporalConv(d, d, kernel_size=(3,), padding="SAME", rngs=rngs)
        elif kind == "transformer":
            self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d, qkv_features=d,
                                               decode=False, rngs=rngs)
            self.norm1 = nnx.LayerNorm(d, rngs=rngs)
            self.norm2 = nnx.LayerNorm(d, rngs=rngs)
            self.ff = nnx.Linear(d, d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array, *, rng: jax.Array | None = None
                 ) -> jax.Array:
        if x.ndim == 2:  # a vector modality is a length-1 sequence
            x = x[:, None, :]
        tmask = time_mask(lengths, x.shape[1])  # [B, T]
        if self.in_norm is not None:
            # Per timestep over the features; padding steps become beta but are masked below.
            x = self.in_norm(x)
        y = nnx.gelu(self.proj(x) + self.pos[None, : x.shape[1]])  # [B, T, d]
        if self.kind == "conv":
            y = nnx.gelu(self.conv(y * tmask[..., None]))
        elif self.kind == "transformer":
            attn_mask = nnx.make_attention_mask(tmask, tmask)  # [B, 1, T, T]
            y = self.norm1(y + self.attn(y, mask=attn_mask, deterministic=True))
            y = self.norm2(y + nnx.gelu(self.ff(y)))
        return dropout(self.out(masked_mean(y, tmask)), self.dropout_rate, rng)


class Fusion(nnx.Module):
    """``z`` ``[B, M, d]`` and presence mask ``[B, M]`` -> joint ``h`` ``[B, d_h]``."""

    def __init__(self, kind: str, num_modalities: int, d: int, d_h: int, *, num_heads: int,
                 dropout: float = 0.0, rngs: nnx.Rngs):
        if kind not in FUSIONS:
            raise ValueError(f"model.fusion: unknown fusion {kind!r}; expected one of {FUSIONS}")
        self.kind = kind
        self.dropout_rate = dropout
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

    def __call__(self, z: jax.Array, mask: jax.Array, *, rng: jax.Array | None = None
                 ) -> jax.Array:
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
        return dropout(nnx.gelu(self.out(y)), self.dropout_rate, rng)


class FusionModel(nnx.Module):
    """Encoders, fusion, task head and reconstruction decoders (DESIGN.md §2, §3.5)."""

    def __init__(self, *, modalities: Sequence[str], feature_shapes: Mapping[str, tuple],
                 task: str, num_classes: int, encoder: str = "mlp", fusion: str = "concat",
                 d: int = 64, d_h: int = 128, num_heads: int = 4, dropout: float = 0.0,
                 input_norm: bool = False,
                 recon_stats: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                 rngs: nnx.Rngs):
        """``recon_stats``: per modality (mean, variance) of the pooled targets, `D_m` floats each
        (`reconstruction_stats`); None: 0 and 1."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.modalities = tuple(modalities)
        self.task = task
        self.num_classes = num_classes
        self.encoders = nnx.List([
            Encoder(encoder, feature_shapes[m][-1],
                    feature_shapes[m][0] if len(feature_shapes[m]) == 2 else 1, d,
                    num_heads=num_heads, input_norm=input_norm, dropout=dropout, rngs=rngs)
            for m in self.modalities
        ])
        self.fusion = Fusion(fusion, len(self.modalities), d, d_h, num_heads=num_heads,
                             dropout=dropout, rngs=rngs)
        out_dim = {"classification": num_classes, "regression": 1, "multilabel": 2 * num_classes}
        self.head = nnx.Linear(d_h, out_dim[task], rngs=rngs)
        self.decoders = nnx.List([
            nnx.Linear(d_h, feature_shapes[m][-1], rngs=rngs) for m in self.modalities
        ])
        # Static tuples (hashable: they live in the graphdef, not in the params pytree).
        stats = recon_stats or {}
        self.recon_affine = tuple(
            (tuple(float(v) for v in stats[m][0]), tuple(float(np.sqrt(v)) for v in stats[m][1]))
            if m in stats else None for m in self.modalities)

    def encode(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None
               ) -> jax.Array:
        """-> ``z`` ``[B, M, d]``; dropout on each ``z_m`` only with an `rng` key."""
        lengths = batch["lengths"]  # [B, M]
        return jnp.stack(
            [enc(batch[m], lengths[:, i], rng=None if rng is None else jax.random.fold_in(rng, i))
             for i, (m, enc) in enumerate(zip(self.modalities, self.encoders, strict=True))],
            axis=1)

    def fuse(self, z: jax.Array, mask: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """-> ``h`` ``[B, d_h]``; dropout on ``h`` only with an `rng` key."""
        return self.fusion(z, mask, rng=rng)

    def predict(self, h: jax.Array) -> jax.Array:
        """-> ``[B, C]`` logits, ``[B]`` regression outputs, or ``[B, K, 2]`` multilabel logits."""
        y = self.head(h)
        if self.task == "regression":
            return y[:, 0]
        if self.task == "multilabel":
            return y.reshape(y.shape[0], self.num_classes, 2)
        return y

    def reconstruct(self, h: jax.Array) -> tuple[jax.Array, ...]:
        """-> one ``[B, D_m]`` time-pooled feature reconstruction per modality, in feature units."""
        out = []
        for dec, affine in zip(self.decoders, self.recon_affine, strict=True):
            y = dec(h)
            if affine is not None:
                y = jnp.asarray(affine[0], y.dtype) + jnp.asarray(affine[1], y.dtype) * y
            out.append(y)
        return tuple(out)


class ApplyFns(NamedTuple):
    """Pure functions of the params pytree, closed over the model's graphdef."""

    encode: Any  # (params, batch, *, rng=None) -> z [B, M, d]
    head: Any  # (params, z, mask, *, rng=None) -> (h [B, d_h], predictions)
    reconstruct: Any  # (params, h) -> tuple of [B, D_m]
    apply: Any  # (params, batch, *, rng=None) -> dict


def make_apply_fns(graphdef: nnx.GraphDef) -> ApplyFns:
    """Builds the pure apply functions for a split :class:`FusionModel` (or a model of your own).

    The model must have ``encode(batch, *, rng=None) -> z [B, M, d]``, ``fuse(z, mask, *,
    rng=None) -> h [B, d_h]``, ``predict(h) -> preds`` and ``reconstruct(h) -> tuple of [B, D_m]``
    (README "Your own model").

    Args:
      graphdef: from ``nnx.split(model, nnx.Param)``.

    Returns:
      :class:`ApplyFns`. ``apply(params, batch, *, rng=None)`` returns a dict with ``z``
      ``[B, M, d]``, ``h`` ``[B, d_h]``, ``preds`` (task-shaped) and ``recon`` (tuple of
      ``[B, D_m]``). ``rng`` (a PRNG key) turns on the model's dropout (``config.model.dropout``)
      for training passes; None, the default, is the deterministic model. ``encode`` and ``head``
      take the same keyword.
    """

    def encode(params, batch, *, rng=None):
        return nnx.merge(graphdef, params).encode(batch, rng=rng)

    def head(params, z, mask, *, rng=None):
        model = nnx.merge(graphdef, params)
        h = model.fuse(z, mask, rng=rng)
        return h, model.predict(h)

    def reconstruct(params, h):
        return nnx.merge(graphdef, params).reconstruct(h)

    def apply(params, batch, *, rng=None):
        k_encode, k_head = (None, None) if rng is None else jax.random.split(rng)
        z = encode(params, batch, rng=k_encode)
        h, preds = head(params, z, batch["mask"], rng=k_head)
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
      strength: scalar, or ``[B]`` for a strength per example (the collapse is linear in its
        strength, ``C_s(Z) = Z - s D`` with ``D = Z - C_1(Z)``, so each row takes its own).
      gamma: scalar forwarded to ``collapse_fn``.
      collapse_fn: ``(Z [B, d], strength, gamma) -> [B, d]``.
      null: optional ``[B, M, d]`` embeddings of the zero-filled input. When given, a collapsed
        modality's centre also moves from its batch mean towards its null embedding by
        ``strength``, so a full collapse lands where a missing modality lands (README,
        "Formulation changes").

    Returns:
      ``[B, M, d]``: ``z`` with the targets' embeddings replaced by their collapse.
    """
    zm = jnp.moveaxis(z, 1, 0)  # [M, B, d]
    per_example = jnp.ndim(strength) == 1
    # Per example: collapse at strength 1 once, then scale each row's displacement.
    s_fn = 1.0 if per_example else strength
    if collapse_fn is spectral_collapse and is_static_zero(gamma):
        collapsed = jax.vmap(collapse_fn, in_axes=(0, None, None))(zm, s_fn, gamma)
    else:
        collapsed = jax.lax.map(lambda x: collapse_fn(x, s_fn, gamma), zm)
    s_rows = jnp.asarray(strength, z.dtype)[None, :, None] if per_example else strength
    if per_example:
        collapsed = zm - s_rows * (zm - collapsed)  # [M, B, d]
    if null is not None:
        collapsed = collapsed + s_rows * (jnp.moveaxis(null, 1, 0)
                                          - jnp.mean(zm, axis=1, keepdims=True))
    t = jnp.broadcast_to(target.astype(z.dtype), z.shape[:2])[:, :, None]
    return z + t * (jnp.moveaxis(collapsed, 0, 1) - z)


def create_model(info, model_cfg, *, rngs: nnx.Rngs) -> FusionModel:
    """Builds a :class:`FusionModel` from a ``DatasetInfo`` and the ``config.model`` block.

    The decoders take their output scale from the info's train statistics (`reconstruction_stats`).
    """
    return FusionModel(modalities=info.modalities, feature_shapes=info.feature_shapes,
                       task=info.task, num_classes=info.num_classes, encoder=model_cfg.encoder,
                       fusion=model_cfg.fusion, d=model_cfg.d, d_h=model_cfg.d_h,
                       num_heads=model_cfg.num_heads,
                       # .get: model blocks written before issue 14 lack these (off).
                       dropout=float(model_cfg.get("dropout", 0.0) or 0.0),
                       input_norm=bool(model_cfg.get("input_norm", False)),
                       recon_stats=reconstruction_stats(info), rngs=rngs)
