"""Named sets of variants for `experiments.sweep` (settings chosen on VALID splits only).

Each set is ``suite -> {variant name: {dotted config field: value}}``. The defaults in default.py
cite the sweep tables they come from (results/selection/).
"""


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


SWEEPS = {"methods": methods}
