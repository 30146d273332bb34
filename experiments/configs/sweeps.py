"""Named sets of variants for `experiments.sweep` (settings chosen on VALID splits only).

Each set is ``suite -> {variant name: {dotted config field: value}}``. The defaults in default.py
cite the sweep tables they come from (results/selection/).
"""

import functools
import itertools

from experiments.configs import default

# The meta-update on every component of phi (mi.meta_params; the default moves the strength only).
ALL_PHI = "strength,reg_weight,rec_weight"
# The defaults before the `defaults` sweep turned the regularizer and the curvature mask off and
# the `meta_cadence` sweep the meta-update: the sets recorded under them (`stress`,
# `meta_params`) pin them, so that they rerun what results/selection/ records.
OLD_DEFAULTS = {"mi.regularizer": True, "mi.curvature": True, "mi.meta": True,
                "mi.meta_every": 50, "mi.meta_lr": 0.05}


def _mi(pinned: dict | None = None, **kw) -> dict:
    """A ModalImmune variant: the `pinned` overrides (dotted keys), then ``mi.<k>`` ones."""
    return {"method": "modalimmune", **(pinned or {}), **{f"mi.{k}": v for k, v in kw.items()}}


def _mi_old_defaults(**kw) -> dict:
    """A ModalImmune variant at `OLD_DEFAULTS` with ``mi.<k>`` overrides."""
    return _mi(OLD_DEFAULTS, **kw)


def methods(suite: str) -> dict:
    """The baselines at their defaults and with the tuning budget each gets (one knob, 2 values)."""
    del suite
    return {
        "erm": {"method": "erm"},
        "moddrop": {"method": "moddrop"},
        "moddrop_p0.5": {"method": "moddrop", "moddrop.p": 0.5},
        "consistency": {"method": "consistency"},
        "ogm_ge": {"method": "ogm_ge"},
        "ogm_ge_alpha0.5": {"method": "ogm_ge", "ogm_ge.alpha": 0.5},
        "modalimmune": {"method": "modalimmune"},
        "modalimmune-none": {"method": "modalimmune", "mi.controller": False,
                             "mi.collapse": False, "mi.regularizer": False,
                             "mi.curvature": False, "mi.meta": False},
    }


def modalimmune(suite: str) -> dict:
    """ModalImmune's formulation: the controller's arms, self-distillation, the strength spread."""
    del suite
    mi = _mi
    return {
        "mi_modality": mi(),
        "mi_pattern": mi(controller_mode="pattern", uniform=0.2),
        "mi_pattern_distill": mi(controller_mode="pattern", uniform=0.2, distill_weight=1.0),
        "mi_pattern_distill_spread": mi(controller_mode="pattern", uniform=0.2,
                                        distill_weight=1.0, strength_spread=0.5),
        "mi_pattern_distill_pclean0": mi(controller_mode="pattern", uniform=0.2,
                                         distill_weight=1.0, p_clean=0.0),
    }


def every_pattern(suite: str) -> dict:
    """Every removal pattern a branch of every step: uniform or Group-DRO weights, distillation,
    the strength spread; and the mechanisms that cost a cotangent or an SVD, off."""
    del suite
    mi = functools.partial(_mi, {"mi.every_pattern": True})
    return {
        "every_uniform": mi(uniform=1.0),
        "every_dro": mi(uniform=0.5),
        "every_dro_t2": mi(uniform=0.5, tau=2.0),
        "every_uniform_distill": mi(uniform=1.0, distill_weight=1.0),
        "every_dro_distill": mi(uniform=0.5, distill_weight=1.0),
        "every_dro_distill_spread": mi(uniform=0.5, distill_weight=1.0, strength_spread=0.5),
        "every_dro_distill_lean": mi(uniform=0.5, distill_weight=1.0, curvature=False,
                                     regularizer=False, meta=False),
    }


MODALITIES = {"digits": ("left", "right", "down"), "synthetic": ("text", "audio", "vision"),
              "npz": ("strong", "medium", "weak")}  # npz: the hetero dataset (data_pipelines)


def oracle(suite: str) -> dict:
    """The per-condition specialists (erm on the kept modalities only): the ceiling on valid."""


    mods = MODALITIES[suite]
    out = {}
    for size in range(len(mods) - 1, 0, -1):
        for kept in itertools.combinations(mods, size):
            out["oracle:" + "+".join(kept)] = {"method": "erm", "use_modalities": ",".join(kept)}
    return out


def contenders(suite: str) -> dict:
    """The baselines and the ModalImmune forms still in the running, with the oracle."""
    base = methods(suite)
    every = every_pattern(suite)
    return {**{k: base[k] for k in ("erm", "moddrop", "moddrop_p0.5", "ogm_ge", "consistency",
                                     "modalimmune", "modalimmune-none")},
            **{k: every[k] for k in ("every_uniform", "every_dro", "every_dro_distill_lean")},
            **oracle(suite)}


def stress(suite: str) -> dict:
    """Each mechanism with and without, in the setting where it is supposed to pay (issue 13).

    - meta: phi mis-set (strength 0.3, regularizer weight 10, reconstruction weight 10), with
      meta-updates often and large enough for phi to travel back (every 10 steps, lr 0.1); on
      all of phi and on the strength alone;
    - curvature: a destructive branch that can destabilise training (collapse weight 5, lr 4x);
    - regularizer: DESIGN's partial, spectrum-adaptive collapse (strength 0.9, gamma 1), where
      the collapsed embedding keeps energy for R to act on;
    - controller: pattern arms with Group-DRO weights against the uniform draw.
    """
    del suite
    mi = _mi_old_defaults
    misset = {"mi.strength": 0.3, "mi.reg_weight": 10.0, "loss.reconstruction": 10.0,
              "mi.meta_every": 10, "mi.meta_lr": 0.1}
    lr = {"optimizer.lr": 2e-2, "mi.collapse_weight": 5.0}
    partial = {"mi.strength": 0.9, "mi.gamma": 1.0}
    pattern = {"mi.controller_mode": "pattern", "mi.uniform": 0.2}
    return {
        "meta_misset": {**mi(meta_params=ALL_PHI), **misset},
        "meta_misset-no_meta": {**mi(meta=False), **misset},
        # The meta-update on the collapse strength alone (the loss weights stay mis-set).
        "meta_misset_strength": {**mi(meta_params="strength"), **misset},
        "curv_stress": {**mi(), **lr}, "curv_stress-no_curvature": {**mi(curvature=False), **lr},
        "reg_partial": {**mi(), **partial},
        "reg_partial-no_regularizer": {**mi(regularizer=False), **partial},
        "ctrl_pattern": {**mi(), **pattern},
        "ctrl_pattern-no_controller": {**mi(controller=False), **pattern},
    }


def meta_params(suite: str) -> dict:
    """The meta-update at the defaults: on all of phi or on the strength alone (the default since
    this sweep; results/selection/*_meta_params.md were written when all of phi was the default,
    so their ``modalimmune`` row is ``modalimmune_meta_all``)."""
    del suite
    mi = _mi_old_defaults
    return {"modalimmune_meta_all": mi(meta_params=ALL_PHI),
            "modalimmune_meta_strength": mi(meta_params="strength"),
            "modalimmune-no_meta": mi(meta=False)}


def defaults(suite: str) -> dict:
    """Each mechanism flipped at the defaults beside ModDrop, named as `experiments.reproduce`'s
    ablation rows (``-no_`` if on, ``-with_`` if off): the evidence each default rests on (issue
    13, "defaults chosen on valid"). results/selection/*_defaults.md ran it when every mechanism
    was on, digits_defaults_now.md at today's defaults."""
    from modalimmune_jax.studies import suite as suite_lib  # noqa: PLC0415 -- configs stay light

    runs = suite_lib.make_runs(["modalimmune"], ablation=True, floor=False,
                               default_on=suite_lib.switches_on(default.get_config(suite).mi))
    return {"moddrop": {"method": "moddrop"}, **{
        run.name: {"method": run.method, **{f"mi.{c}": False for c in run.disabled},
                   **{f"mi.{c}": True for c in run.enabled}} for run in runs}}


def meta_cadence(suite: str) -> dict:
    """How often and how far the meta-update moves the strength (issue 15: the meta-update was the
    step's largest cost; results/selection/*_meta_cadence.md). With the strength mis-set to 0.3
    (the stress where the meta-update pays) and at the configured strength: no meta-update, the
    cadence that was the default when this sweep ran (every 50 steps, lr 0.05; the variants
    without a suffix), half as often at twice the lr, and every 10 at lr 0.1 (the stress sweep's,
    and the cadence of ``mi.meta=True`` since)."""
    del suite
    mi = _mi
    every = lambda n, lr: {"meta": True, "meta_every": n, "meta_lr": lr}
    out = {}
    for prefix, extra in (("misset", {"strength": 0.3}), ("modalimmune", {})):
        out.update({f"{prefix}-no_meta": mi(meta=False, **extra),
                    f"{prefix}": mi(**every(50, 0.05), **extra),
                    f"{prefix}-every100_lr0.1": mi(**every(100, 0.1), **extra)})
    out["misset-every10_lr0.1"] = mi(**every(10, 0.1), strength=0.3)
    return out


def collapse_weight(suite: str) -> dict:
    """The weight of the collapsed branch's task loss (issue 13: on synthetic at 3000 steps
    ModalImmune's valid missing Avg peaks at step 250 and declines, while ModDrop's peaks at
    1000-1250; results/selection/synthetic_3000_checkpoints.md). ModDrop beside it, as the mark."""
    del suite
    return {"moddrop": {"method": "moddrop"}, "modalimmune": _mi(),
            **{f"mi_cw{w}": _mi(collapse_weight=w) for w in (0.5, 0.25)}}


def distill(suite: str) -> dict:
    """Self-distillation without the pattern controller's cost on digits and hetero (issue 13:
    pattern + distillation at weight 1 closed synthetic's 3000-step gap to ModDrop on valid but
    cost 1-2 points on the other two; results/selection/*_modalimmune_now.md). The distillation
    on the modality controller, at a third of the weight, in both directions of the KL
    (``soft``: the clean prediction as the collapsed branch's soft target) and at temperatures
    2 and 4 (the soft target at 2: knowledge distillation as in Hinton et al.). ModDrop beside
    it. results/selection/*_distill.md; none paid on every dataset."""
    del suite
    return {"moddrop": {"method": "moddrop"}, "modalimmune": _mi(),
            "mi_distill1": _mi(distill_weight=1.0), "mi_distill0.3": _mi(distill_weight=0.3),
            "mi_soft1": _mi(distill_weight=1.0, distill_kl="clean_collapsed"),
            "mi_soft0.3": _mi(distill_weight=0.3, distill_kl="clean_collapsed"),
            "mi_pattern_soft1": _mi(controller_mode="pattern", uniform=0.2, distill_weight=1.0,
                                    distill_kl="clean_collapsed"),
            # A confident clean prediction puts log-ratios of 10+ nats into KL(collapsed ||
            # clean) (3-7 nats logged on synthetic and hetero): the temperature bounds them.
            "mi_distill1_t2": _mi(distill_weight=1.0, distill_temperature=2.0),
            "mi_distill1_t4": _mi(distill_weight=1.0, distill_temperature=4.0),
            "mi_distill0.3_t4": _mi(distill_weight=0.3, distill_temperature=4.0),
            # The textbook knowledge distillation: the soft target at a temperature.
            "mi_soft1_t2": _mi(distill_weight=1.0, distill_kl="clean_collapsed",
                               distill_temperature=2.0)}


def confidence(suite: str) -> dict:
    """Is the entropy term of KL(collapsed || clean) what pays on synthetic (the `distill` set's
    finding)? KL(collapsed || uniform), a confidence penalty with no teacher, at two weights.
    results/selection/*_confidence.md."""
    del suite
    return {"moddrop": {"method": "moddrop"}, "modalimmune": _mi(),
            **{f"mi_conf{w}": _mi(distill_weight=w, distill_kl="collapsed_uniform")
               for w in (0.1, 0.3)}}


def distill_pick(suite: str) -> dict:
    """The `distill` set's best form at two weights, beside ModDrop and today's default
    (results/selection/*_distill_pick.md; synthetic at 600 steps too)."""
    d = distill(suite)
    return {**{k: d[k] for k in ("moddrop", "modalimmune", "mi_distill1_t2")},
            "mi_distill0.5_t2": _mi(distill_weight=0.5, distill_temperature=2.0)}


def distill_budget(suite: str) -> dict:
    """One knob with two values for each of ModDrop (p) and ModalImmune (distillation off, or
    at weight 1 and T 2), chosen per dataset on valid: the same tuning budget for both
    (results/selection/*_distill_budget.md; docs/formulation.md)."""
    return {**{k: methods(suite)[k] for k in ("moddrop", "moddrop_p0.5", "modalimmune")},
            "mi_distill1_t2": distill(suite)["mi_distill1_t2"]}


def first_look(suite: str) -> dict:
    """The baselines and ModalImmune's variants in one sweep."""
    return {**methods(suite), **modalimmune(suite)}


SWEEPS = {"methods": methods, "modalimmune": modalimmune, "every_pattern": every_pattern,
          "first_look": first_look, "oracle": oracle, "contenders": contenders,
          "stress": stress, "meta_params": meta_params,
          "defaults": defaults, "meta_cadence": meta_cadence, "collapse_weight": collapse_weight,
          "distill": distill, "distill_pick": distill_pick,
          "distill_budget": distill_budget, "confidence": confidence}
