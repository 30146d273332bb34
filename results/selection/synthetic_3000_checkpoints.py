r"""Lab script (issue 13): valid missing Avg of every 250-step checkpoint, synthetic at 3000 steps.

The suite picks each run's checkpoint on full-modality valid accuracy. This trains ModDrop and
ModalImmune (today's defaults, the suite's synthetic config, seeds 0-2), keeps every checkpoint,
and evaluates each one's params on the VALID split's missing conditions (`zero` and `mask`), to
see where each method's missing Avg peaks and what the full-accuracy pick gets. VALID only.

  JAX_PLATFORMS=cpu python results/selection/synthetic_3000_checkpoints.py OUT_DIR
"""

import json
import os
import sys

import orbax.checkpoint as ocp

import data_pipelines
from experiments.configs import default
from modalimmune_jax.training import checkpoint, trainer

out = sys.argv[1]
rows = {}
for method in ("moddrop", "modalimmune"):
    for seed in range(3):
        config = default.get_config("synthetic")
        with config.unlocked():
            config.method, config.seed = method, seed
            config.keep_checkpoints = 100
            config.eval.protocol, config.eval.split = "full", "valid"
            config.dataset.data_dir = os.path.join(out, "data")
        workdir = os.path.join(out, method, f"seed{seed}")
        if not os.path.exists(os.path.join(workdir, "eval_valid.json")):
            trainer.train(config, workdir, progress=False)
        run = trainer.load_trained(workdir)
        built = run.setup
        abstract = trainer.restore_target(run.config, built, run.mesh)
        evaluator = trainer.make_evaluator(config, built, run.mesh)
        valid = data_pipelines.load_split(config.dataset, "valid", data_dir=built.data_dir)
        mngr = checkpoint.manager(workdir, keep=100)
        curve = {}
        for step in sorted(mngr.all_steps()):
            state = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
            r = evaluator.protocol(state["train"]["params"], valid, kind="missing")
            curve[step] = {"full": r["full"]["acc"], "zero": r["missing_avg"]["acc"],
                           "mask": r["missing_avg_mask"]["acc"]}
        mngr.close()
        rows[f"{method}/seed{seed}"] = {"best_step": run.meta["best_step"], "curve": curve}
        print(method, seed, run.meta["best_step"],
              {s: (round(c["full"], 4), round(c["zero"], 4), round(c["mask"], 4))
               for s, c in curve.items()}, flush=True)
with open(os.path.join(out, "curves.json"), "w") as f:
    json.dump(rows, f, indent=1)
