"""Writes compose_transforms.ipynb from the cells below (keeps the notebook reviewable as code).

  python notebooks/make_compose_transforms.py
"""

import pathlib

import nbformat

CELLS = [
    ("md", """# Composing the ModalImmune transforms

Each transform is a pure, jit-able function of pytrees (DESIGN.md §3). This notebook composes them on
small problems and checks each against an exact reference:
1. the spectral collapse operator and the spectra before/after;
2. the information-gain controller reacting to a model that ignores a modality;
3. curvature estimates (HVP, Hutchinson, Lanczos extremes) against the explicit Hessian;
4. the certified Neumann hypergradient against the closed form on ridge regression;
5. the curvature mask as the first link of an optax chain, fed a curvature EMA."""),
    ("code", """import jax, jax.numpy as jnp, numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
jax.config.update("jax_enable_x64", True)
import modalimmune_jax as mi
from modalimmune_jax.spectral import singular_value_spectrum"""),
    ("md", "## 1. Spectral collapse: `C(Z) = mu + U diag(s (1 - strength w)) Vt`"),
    ("code", """rng = np.random.default_rng(0)
Z = jnp.asarray(rng.normal(size=(128, 16)) * np.geomspace(3.0, 0.1, 16))  # [B, d], decaying spectrum
fig, ax = plt.subplots(figsize=(5, 3))
for strength in (0.0, 0.5, 0.9):
    Zc = jax.jit(mi.spectral_collapse)(Z, strength, 1.0)
    ax.semilogy(singular_value_spectrum(Zc), marker="o", label=f"strength={strength}")
    print(f"strength={strength}: effective rank {float(mi.effective_rank(Zc)):.2f}")
ax.set_xlabel("index"); ax.set_ylabel("energy share"); ax.legend(); plt.show()
full = mi.spectral_collapse(Z, 1.0, 0.0)
assert np.allclose(full, Z.mean(0, keepdims=True), atol=1e-8)  # strength 1, gamma 0: batch mean
print("collapse regularizer, identical:", float(mi.collapse_regularizer(Z, Z)),
      " vs collapsed:", float(mi.collapse_regularizer(Z, mi.spectral_collapse(Z, 0.9, 1.0))))"""),
    ("md", "## 2. The controller: signed leave-one-out information gain"),
    ("code", """mods = ("text", "audio", "vision")
x = {m: jnp.asarray(rng.normal(size=(256, 4))) for m in mods}
batch = {**x, "mask": jnp.ones((256, 3)), "label": x["text"] @ jnp.ones(4) + 0.3 * x["audio"] @ jnp.ones(4)}
params = {"text": jnp.ones(4), "audio": 0.3 * jnp.ones(4), "vision": jnp.zeros(4)}  # ignores vision

def per_example_loss(p, b):
    pred = sum(b["mask"][:, i] * (b[m] @ p[m]) for i, m in enumerate(mods))
    return jnp.square(pred - b["label"])

ig = mi.information_gain(per_example_loss, params, batch, modalities=mods,
                        key=jax.random.key(0), mask_prob=0.5)  # the shared removal rule
state = mi.update_controller(mi.init_controller(3), ig)
probs = mi.controller.target_probabilities(state, p_clean=0.2, tau=1.0)
print("IG:", dict(zip(mods, np.round(np.asarray(ig), 4))))
print("P(target):", dict(zip(mods, np.round(np.asarray(probs), 3))))
assert abs(float(ig[2])) < 1e-9 and ig[0] > ig[1] > 0"""),
    ("md", "## 3. Curvature against the explicit Hessian"),
    ("code", """from jax.flatten_util import ravel_pytree
p0 = {"W1": jnp.asarray(rng.normal(size=(3, 5))) * 0.5, "W2": jnp.asarray(rng.normal(size=(5,)))}
X, y = jnp.asarray(rng.normal(size=(20, 3))), jnp.asarray(rng.normal(size=(20,)))
f = lambda p: jnp.mean((jnp.tanh(X @ p["W1"]) @ p["W2"] - y) ** 2)
flat, unravel = ravel_pytree(p0)
H = jax.hessian(lambda v: f(unravel(v)))(flat)
v = jax.tree.map(jnp.ones_like, p0)
print("HVP error:", float(jnp.max(jnp.abs(ravel_pytree(mi.hvp(f, p0, v))[0] - H @ ravel_pytree(v)[0]))))
for n in (8, 512):
    d = ravel_pytree(mi.hutchinson_diagonal(f, p0, jax.random.key(0), n))[0]
    print(f"Hutchinson n={n}: max |error| {float(jnp.max(jnp.abs(d - jnp.diag(H)))):.4f}")
lam_max, lam_min = mi.extreme_eigenvalues(f, p0, jax.random.key(1), 20)
eig = np.linalg.eigvalsh(np.asarray(H))
print(f"Lanczos: lam_max {float(lam_max):.5f} vs {eig[-1]:.5f}; lam_min {float(lam_min):.5f} vs {eig[0]:.5f}")"""),
    ("md", "## 4. Certified Neumann hypergradient vs the ridge closed form"),
    ("code", """Xt, yt = jnp.asarray(rng.normal(size=(40, 6))), jnp.asarray(rng.normal(size=(40,)))
Xv, yv = jnp.asarray(rng.normal(size=(30, 6))), jnp.asarray(rng.normal(size=(30,)))
phi = jnp.log(2.0)
A = Xt.T @ Xt + jnp.exp(phi) * jnp.eye(6)
w_star = jnp.linalg.solve(A, Xt.T @ yt)
inner = lambda w, m: 0.5 * jnp.sum((Xt @ w - yt) ** 2) + 0.5 * jnp.exp(m) * jnp.sum(w ** 2)
outer = lambda w: 0.5 * jnp.sum((Xv @ w - yv) ** 2)
exact = -jnp.exp(phi) * w_star @ jnp.linalg.solve(A, Xv.T @ (Xv @ w_star - yv))
hg, cert = mi.implicit_hypergradient(inner, outer, w_star, phi, num_terms=400, key=jax.random.key(0))
print(f"hypergradient {float(hg):.6f} vs exact {float(exact):.6f}")
print({k: float(cert[k]) for k in ("valid", "bound", "residual_norm", "posterior_bound")})
assert abs(float(hg) - float(exact)) <= 1e-3 * abs(float(exact)) and bool(cert["valid"])"""),
    ("md", """## 5. The curvature mask in the optimizer chain

`curvature_mask` damps the destructive part `d` of the update where `|diag H|` is high:
`u' = u - (1 - s) d`. Given a `CurvatureEMA`, it recomputes the scale `s` only when the
EMA's `count` moves (the quantile over every parameter is the costly part), and keeps it in its
state."""),
    ("code", """import optax
from modalimmune_jax.curvature import init_curvature_ema, update_curvature_ema
diag = mi.hutchinson_diagonal(f, p0, jax.random.key(2), 64)
ema = update_curvature_ema(init_curvature_ema(p0), diag, decay=0.9)
tx = optax.chain(mi.curvature_mask(quantile=0.5, mode="hard"), optax.sgd(1.0))
g = jax.grad(f)(p0)
destructive = jax.tree.map(lambda x: 0.5 * x, g)  # pretend half the gradient is destructive
updates, state = tx.update(g, tx.init(p0), p0, curvature=ema, destructive=destructive)
h = np.abs(ravel_pytree(ema.diag)[0])
keep = np.where(h > np.quantile(h, 0.5), 0.0, 1.0)  # hard mask: drop d above the median
expected = -(ravel_pytree(g)[0] - (1 - keep) * ravel_pytree(destructive)[0])
print("mask error:", float(jnp.max(jnp.abs(ravel_pytree(updates)[0] - expected))),
      " fraction masked:", float(state[0].fraction_masked))
assert np.allclose(ravel_pytree(updates)[0], expected)"""),
]


def main():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in CELLS]
    out = pathlib.Path(__file__).with_name("compose_transforms.ipynb")
    nbformat.write(nb, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
