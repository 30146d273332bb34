"""Times HVPs and Neumann terms against a gradient on a ~1M-parameter tanh MLP (DESIGN.md §8).

  python -m experiments.bench_hvp
  python -m experiments.bench_hvp --width=576 --depth=3 --batch=256 --repeats=10 --out=/tmp/hvp.json

Prints one JSON object: median seconds of a jitted grad, a forward-over-reverse HVP, an HVP from a
reused linearisation, one Neumann term (the slope of the Neumann solve's time in K, so the fixed
costs cancel) and a Lanczos spectrum estimate; their ratios; and compile time against K.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from modalimmune_jax.curvature import extreme_eigenvalues, hvp, linearized_hvp
from modalimmune_jax.hypergrad import neumann_inverse_hvp

_WIDTH = flags.DEFINE_integer("width", 576, "Hidden width (square layers).")
_DEPTH = flags.DEFINE_integer("depth", 3, "Number of width x width tanh layers.")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (median reported).")
_TERMS = flags.DEFINE_multi_integer("num_terms", [2, 12], "Two Neumann K for the per-term slope.")
_COMPILE_TERMS = flags.DEFINE_multi_integer("compile_terms", [5, 50, 500], "K for compile times.")
_LANCZOS_ITERS = flags.DEFINE_integer("lanczos_iters", 20, "Lanczos iterations to time.")
_OUT = flags.DEFINE_string("out", None, "Optional path to also write the JSON to.")


def _problem(width, depth, batch):
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * depth + 2)
    params = {
        f"layer{i}": {
            "w": jax.random.normal(keys[2 * i], (width, width)) / jnp.sqrt(width),
            "b": jnp.zeros((width,)),
        }
        for i in range(depth)
    }
    x = jax.random.normal(keys[-2], (batch, width))
    y = jax.random.normal(keys[-1], (batch, width))

    def loss_fn(p):
        h = x
        for i in range(depth):
            h = jnp.tanh(h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"])
        return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))

    return loss_fn, params


def _median_seconds(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up: compile and first run
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    loss_fn, params = _problem(_WIDTH.value, _DEPTH.value, _BATCH.value)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    v = jax.tree.map(lambda p: jnp.ones_like(p) / jnp.sqrt(num_params), params)
    repeats = _REPEATS.value

    grad_fn = jax.jit(jax.grad(loss_fn))
    hvp_fn = jax.jit(lambda p, u: hvp(loss_fn, p, u))
    # The linearisation is built once outside the timing, as Hutchinson/Lanczos/Neumann reuse it.
    lin_hvp = jax.jit(linearized_hvp(loss_fn, params))
    t_grad = _median_seconds(grad_fn, params, repeats=repeats)
    t_hvp = _median_seconds(hvp_fn, params, v, repeats=repeats)
    t_lin = _median_seconds(lin_hvp, v, repeats=repeats)

    def neumann(num_terms, linearize):
        # A given spectrum skips Lanczos, so the time is the K-term scan plus one residual HVP.
        def solve(p, u):
            op = linearized_hvp(loss_fn, p) if linearize else (lambda w: hvp(loss_fn, p, w))
            x, cert = neumann_inverse_hvp(
                op, u, num_terms=num_terms, damping=1.0, spectrum=(1.0, 10.0)
            )
            return x, cert["residual_norm"]

        return jax.jit(solve)

    k_lo, k_hi = sorted(_TERMS.value)[:2]
    per_term = {}
    for linearize in (False, True):
        t_lo = _median_seconds(neumann(k_lo, linearize), params, v, repeats=repeats)
        t_hi = _median_seconds(neumann(k_hi, linearize), params, v, repeats=repeats)
        per_term["linearized" if linearize else "hvp"] = (t_hi - t_lo) / (k_hi - k_lo)

    compile_s = {}
    for k in _COMPILE_TERMS.value:
        start = time.perf_counter()
        neumann(k, True).lower(params, v).compile()
        compile_s[str(k)] = time.perf_counter() - start

    lanczos = jax.jit(
        lambda p: extreme_eigenvalues(loss_fn, p, jax.random.PRNGKey(1), _LANCZOS_ITERS.value)
    )
    t_lanczos = _median_seconds(lanczos, params, repeats=max(3, repeats // 4))

    result = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "num_params": int(num_params),
        "width": _WIDTH.value,
        "depth": _DEPTH.value,
        "batch": _BATCH.value,
        "repeats": repeats,
        "median_s": {
            "grad": t_grad,
            "hvp": t_hvp,
            "hvp_linearized": t_lin,
            "neumann_term_hvp": per_term["hvp"],
            "neumann_term_linearized": per_term["linearized"],
            f"lanczos_{_LANCZOS_ITERS.value}": t_lanczos,
        },
        "ratios": {
            "hvp_over_grad": t_hvp / t_grad,
            "hvp_linearized_over_grad": t_lin / t_grad,
            "neumann_term_over_hvp": per_term["hvp"] / t_hvp,
            "neumann_term_linearized_over_hvp": per_term["linearized"] / t_hvp,
        },
        "neumann_compile_s_by_num_terms": compile_s,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
