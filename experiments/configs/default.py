r"""Default config: one file, a preset per dataset.

Usage (the part after ':' picks the preset; extra comma-separated words modify it):

  python -m experiments.train --config=experiments/configs/default.py:digits --workdir=runs/digits
  python -m experiments.train --config=experiments/configs/default.py:synthetic \
      --config.method=moddrop --workdir=/tmp/mi_syn
  python -m experiments.train --config=experiments/configs/default.py:synthetic_regression \
      --workdir=/tmp/mi_reg
  python -m experiments.train --config=experiments/configs/default.py:cmu_mosi \
      --config.dataset.path=/data/MOSI --workdir=/tmp/mi_mosi
  python -m experiments.train --config=experiments/configs/default.py:npz \
      --config.dataset.path=/data/my_npz_folder --workdir=/tmp/mi_npz
  # CPU smoke test: the `tiny` modifier shrinks steps and model.
  python -m experiments.train --config=experiments/configs/default.py:digits,tiny --workdir=/tmp/t

Presets: synthetic, synthetic_regression, digits (default), npz, cmu_mosi, cmu_mosei, iemocap.
Modifiers: tiny (a few steps, small model; for tests and smoke runs).
"""

import ml_collections

PRESETS = ("synthetic", "synthetic_regression", "digits", "npz", "cmu_mosi", "cmu_mosei", "iemocap")
MODIFIERS = ("tiny",)


def _dataset(preset: str) -> ml_collections.ConfigDict:
    ds = ml_collections.ConfigDict()
    # Which builder in data_pipelines/ to use.
    ds.name = {"synthetic_regression": "synthetic"}.get(preset, preset)
    # Folder with the user's files (pickles or the npz folder); "" for generated data.
    ds.path = ""
    # Where the TFDS array_record files go; "" means <workdir>/data.
    ds.data_dir = ""
    # MMSA aligned/unaligned or MulT pickle; "auto" picks whichever file is in `path`.
    ds.layout = "auto"
    # Pad/truncate every sequence to this many timesteps; 0 keeps the stored length.
    ds.max_len = 0
    # Feature normalization, fitted on the train split when the dataset is built (a new value
    # rebuilds): "none" | "standardize" (per feature, valid timesteps only; MMSA's -inf audio and
    # padding stay 0). data_pipelines/pipeline.py's DEFAULT_NORMALIZE holds the same defaults.
    # - npz: standardize. A user's views can differ in scale by 1000x (issue 14; DESIGN.md §6).
    # - cmu_mosi / cmu_mosei / iemocap: none. MMSA's data_loader and MulT's dataset.py feed the
    #   published features as they are (only audio -inf -> 0; MMSA's `need_normalized` averages
    #   over time, it does not rescale), and their published numbers are on those features.
    # - digits: standardize, chosen on valid with erm (get_config's digits block: 0.990 vs 0.988
    #   with none, seeds 0-2). synthetic: none, chosen on valid with erm at the defaults (seeds
    #   0-1): 0.921 vs 0.908 standardized; its features are already on one scale.
    ds.normalize = {"npz": "standardize", "digits": "standardize"}.get(ds.name, "none")
    # synthetic only: "classification" or "regression".
    ds.task = "regression" if preset == "synthetic_regression" else "classification"
    # synthetic only: sizes and generator seed (the data stay fixed across training seeds).
    ds.num_train = 2000
    ds.num_valid = 500
    ds.num_test = 1000
    ds.num_classes = 4
    ds.seq_len = 8
    ds.latent_dim = 8
    ds.data_seed = 0
    # Read each split into RAM once and let grain walk over batches (fast); False streams the
    # array_record records one by one (for splits that do not fit in memory).
    ds.in_memory = True
    # grain worker processes for the training loader (0 = in the main process).
    ds.worker_count = 0
    return ds


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config for `arg` = "<preset>[,<modifier>...]" (default "digits")."""
    words = [w for w in (arg or "digits").split(",") if w]
    preset, modifiers = words[0], words[1:]
    if preset not in PRESETS:
        raise ValueError(f"unknown config preset {preset!r}; expected one of {PRESETS}")
    for m in modifiers:
        if m not in MODIFIERS:
            raise ValueError(f"unknown config modifier {m!r}; expected one of {MODIFIERS}")

    config = ml_collections.ConfigDict()
    config.preset = arg or "digits"
    # Training seed: init, shuffling and every stochastic intervention derive from it.
    config.seed = 0
    # erm | moddrop | consistency | ogm_ge | modalimmune (DESIGN.md §4).
    config.method = "erm"
    config.num_steps = 3000
    config.batch_size = 64
    # Comma-separated modalities the model may see ("" = all). The others are cut off at the
    # input in training and evaluation alike: a specialist for one missing condition (the oracle
    # row of `reproduce`).
    config.use_modalities = ""
    # Intervals, in steps.
    config.log_every = 50
    config.eval_every = 250
    config.checkpoint_every = 250
    # How many recent checkpoints to keep for resuming (the best-on-valid one is kept apart).
    config.keep_checkpoints = 2

    config.optimizer = ml_collections.ConfigDict()
    # adamw with linear warmup then cosine decay to `end_lr_factor * lr`.
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.end_lr_factor = 0.05
    config.optimizer.weight_decay = 1e-4
    # Global-norm clipping (0 disables).
    config.optimizer.grad_clip = 1.0
    # Non-finite updates are skipped; after this many in a row the run aborts.
    config.optimizer.max_consecutive_nonfinite = 20

    config.model = ml_collections.ConfigDict()
    # Per-modality encoder: mlp (mean-pool MLP) | conv (1-D temporal conv) | transformer.
    config.model.encoder = "mlp"
    # Fusion: concat (concat + MLP) | attention (over modality tokens, with the presence mask).
    config.model.fusion = "concat"
    config.model.d = 64
    config.model.d_h = 128
    config.model.num_heads = 4
    # Dropout rate on each encoder's output and on the joint representation; active only in the
    # training passes of erm / moddrop / consistency (methods get it by passing a key).
    config.model.dropout = 0.0
    # LayerNorm over each modality's features before its encoder (model.py: a removed, zero-filled
    # modality maps to the LayerNorm bias, one fixed input for every example). Off: on the hetero
    # fixture it rescues unstandardized erm (valid 0.983 vs chance), but under ModalImmune's
    # spectral collapse it turns every meta-update certificate NaN (second derivatives of the SVD
    # on near-degenerate embeddings; finite with mi.collapse=False).
    config.model.input_norm = False

    config.loss = ml_collections.ConfigDict()
    # Regression loss: l1 (MMSA's choice for MOSI/MOSEI) or mse.
    config.loss.regression = "l1"
    # Weight of the reconstruction loss (DESIGN.md §3.5); decoders train on it.
    config.loss.reconstruction = 0.1

    # DESIGN.md §2: the one training-time removal rule every method shares. A removed modality
    # is zero-filled and, with this probability (drawn per example), also flagged absent in the
    # presence mask, so that both test protocols (`zero`: mask left 1; `mask`: mask 0) are trained.
    config.removal = ml_collections.ConfigDict()
    config.removal.mask_prob = 0.5

    config.moddrop = ml_collections.ConfigDict()
    # Each modality is removed with this probability, keeping at least one; whether a removal is
    # also flagged in the mask is config.removal.mask_prob's business, as for every method.
    config.moddrop.p = 0.3

    config.consistency = ml_collections.ConfigDict()
    # Cai et al. 2505.19616: PGD on one modality's raw features, then a KL (MSE for regression)
    # penalty towards the clean prediction. DESIGN.md §4's settings. Checked on the synthetic valid
    # split (--fast, seed 0, missing_avg acc): eps 0.05 / 0.5 / 2.0 at weight 0.01 gave 0.648 /
    # 0.649 / 0.651, and weight 1.0 at eps 0.5 / 2.0 gave 0.643 / 0.639 (full acc down to 0.904):
    # the penalty targets perturbations, not missing modalities, so no setting moves it off erm.
    config.consistency.alpha = 0.1
    config.consistency.eps = 0.05
    config.consistency.steps = 2
    config.consistency.weight = 0.01

    # OGM-GE (Peng et al., CVPR 2022; modalimmune_jax/methods/ogm_ge.py): each modality ahead
    # of the weakest gets its encoder's gradient scaled by 1 - tanh(alpha * ratio), plus noise.
    config.ogm_ge = ml_collections.ConfigDict()
    # The official README's default (0.1, VGGSound); it recommends 0.8 for CREMA-D.
    config.ogm_ge.alpha = 0.1
    # Modulation window, inclusive, in fractions of num_steps: the official default modulates
    # epochs 0 to 50 of 100. Outside it the coefficients are logged but not applied.
    config.ogm_ge.modulation_starts = 0.0
    config.ogm_ge.modulation_ends = 0.5
    # GE: Gaussian noise with each encoder weight gradient's std (False: OGM alone).
    config.ogm_ge.noise = True

    # ModalImmune (DESIGN.md §3). Each component has an on/off switch for the ablation.
    config.mi = ml_collections.ConfigDict()
    # Information-gain controller (§3.1); off: uniform target. At the old defaults on VALID
    # (results/selection/*_defaults.md, 3 seeds, missing Avg zero / mask): -0.5 / -0.6 on digits,
    # -0.3 / -0.1 on synthetic, +1.1 / +1.0 on the hetero npz, where the views differ in scale
    # and strength. Kept: it is cheap (0.55 ms a step amortized on digits) and pays on the
    # heterogeneous views, the case of the real data of issue 13.
    config.mi.controller = True
    config.mi.ig_every = 10
    config.mi.ema_beta = 0.9
    config.mi.p_clean = 0.2
    config.mi.tau = 0.5
    # Up to this many modalities collapsed in one step (k ~ Uniform{1..max_targets}, drawn from the
    # controller's softmax without replacement); 1 is DESIGN.md's single target.
    config.mi.max_targets = 2
    # Draw the targets per example (True) or once per batch (DESIGN.md's single batch target).
    config.mi.per_example = True
    # The controller's arms: "modality" (DESIGN.md §3.1: up to max_targets modalities drawn from
    # softmax(G_m / tau)) or "pattern" (one of the 2^M - 2 removal patterns per example, from
    # softmax(G_S / tau) over each pattern's gain: Group-DRO weights on the test conditions).
    # Kept "modality" on digits VALID (1500 steps, seeds 0-1, missing Avg zero / mask): modality
    # 94.8 / 95.0; pattern 93.7 / 94.3, with distillation 94.2 / 94.3; every pattern per step
    # 94.9 / 94.8 (seed 0); moddrop 94.9 / 94.8 (results/selection/digits_first_look.md). Under
    # stress (500 steps, 3 seeds) pattern + DRO beat uniform patterns by +0.6 / +0.3, under one
    # pooled std (results/selection/digits_stress.md).
    config.mi.controller_mode = "modality"
    # Pattern mode: the share of the uniform distribution mixed into the draw.
    config.mi.uniform = 0.0
    # Every removal pattern is a branch of every step, weighted by (1 - uniform) softmax(G_S /
    # tau) + uniform / P (the controller's Group-DRO weights; uniform with the controller off),
    # instead of one drawn pattern per example. The encoders run once either way: a branch is a
    # fusion and a head on the collapsed embeddings.
    config.mi.every_pattern = False
    # Weight of the self-distillation on the hit examples (0: off), and its direction:
    # "collapsed_clean" is KL(collapsed prediction || clean prediction), mode-seeking, with an
    # entropy bonus for the collapsed prediction; "clean_collapsed" is KL(clean || collapsed),
    # the clean prediction as a soft target, whose minimiser over the data is the clean
    # prediction averaged over what the removed modalities could have been; "collapsed_uniform"
    # is KL(collapsed || uniform), a confidence penalty on the collapsed prediction (no teacher).
    # Both predictions' logits are divided by the temperature, the KL multiplied by its square.
    # Off, chosen on VALID (results/selection/*_distill.md, *_distill_pick.md; 3 seeds, missing
    # Avg zero / mask against off): KL(collapsed || clean) at weight 1, T 2: +3.3 / +3.2 on
    # synthetic at 3000 steps (75.8 / 76.0, ModDrop 74.9 / 75.0), +0.1 / +0.1 at 600, but
    # -0.7 / -0.6 on digits and -1.6 / -1.7 on the hetero npz (full accuracy 97.0 against
    # 98.3); at T 1: +2.7 / +3.3, -1.8 / -2.1, -0.4 / -0.5; weight 0.5 at T 2: +2.7 / +3.1,
    # -0.6 / -0.8, -1.3 / -1.2; T 4 costs more everywhere. The soft-target direction
    # ("clean_collapsed", weight 1): +1.6 / +1.3, -0.4 / -0.3, -0.3 / -0.2; at T 2: +1.8 /
    # +1.8, -0.7 / -0.5, +0.3 / +0.0. The confidence
    # penalty ("collapsed_uniform", results/selection/*_confidence.md) at weight 0.1: +0.4 /
    # +0.3, -0.4 / -0.2, +0.5 / +0.2; at 0.3: +0.1 / -0.1, -0.5 / +0.0, +0.5 / +0.4.
    config.mi.distill_weight = 0.0
    config.mi.distill_kl = "collapsed_clean"
    config.mi.distill_temperature = 1.0
    # Each hit example's strength is strength * (1 - strength_spread * u), u ~ U[0, 1]: 0 always
    # collapses at the strength; 1 spreads it down to 0 (partial destruction, like corruption).
    config.mi.strength_spread = 0.0
    # Spectral collapse of the target's embedding (§3.2); off: zero-fill the target instead.
    # At the old defaults on VALID (*_defaults.md): -0.3 / -0.3 digits, -0.1 / +0.0 synthetic,
    # +0.2 / +0.3 npz. Kept: the zero-fill is not cheaper (a second encoder pass on the batch).
    config.mi.collapse = True
    # Initial collapse strength in (0, 1) (a meta-parameter) and the energy exponent gamma.
    # Chosen on the synthetic valid split (missing_avg acc, --fast, seed 0): strength 0.99 with
    # gamma 0 gave 0.769; strength 0.9 with gamma 1 gave 0.746; zero-filling the targets instead
    # of collapsing them 0.767; moddrop 0.749. README "Formulation changes" has the reasoning.
    config.mi.strength = 0.99
    config.mi.gamma = 0.0
    # Centre of a full collapse: "null" (the zero-filled input's embedding) or "mean" (batch mean).
    config.mi.anchor = "null"
    # Deprecated: config.removal.mask_prob (one rule for every method). Still read for one
    # release, with a warning, when set.
    config.mi.mask_prob = None
    # Weight of the task loss on the collapsed representation. 1.0 kept on VALID
    # (results/selection/*_collapse_weight.md, 3 seeds, missing Avg zero / mask against 1.0):
    # 0.5: +0.1 / +0.3 synthetic (3000 steps), -0.5 / -0.3 digits, +0.3 / +0.2 hetero npz;
    # 0.25: +0.7 / +0.6, -0.6 / -0.6, +0.7 / +0.3. Not a win on every dataset, and synthetic's
    # gain leaves it 1.6 points behind ModDrop.
    config.mi.collapse_weight = 1.0
    # Collapse regularizer R (§3.2) and its initial weight (a meta-parameter).
    # Off by default, chosen on VALID (results/selection/*_defaults.md: each mechanism off in turn
    # at the old defaults, 3 seeds, synthetic / digits / hetero npz). The rule: a mechanism that
    # costs step time stays on only if it pays by >= 1 pooled std under both protocols, on some
    # dataset at the defaults or in its own stress setting (docs/formulation.md). R: +0.2 / +0.2
    # (digits), -0.0 / -0.0 (synthetic), +0.1 / -0.1 (npz) points of missing Avg zero / mask, all
    # under 0.5 pooled std; under stress (partial collapse, results/selection/digits_stress.md)
    # -1.3 / -0.0. Its two SVDs were the largest cost of the step (8.1 against 11.1 ms,
    # docs/performance.md). Switched back on at the new defaults (digits_defaults_now.md): -0.7 /
    # -0.4 (-2.5 / -2.2 pooled std).
    config.mi.regularizer = False
    config.mi.reg_weight = 0.1
    # Curvature-aware masking of the destructive gradient (§3.3). Off by default by the same rule
    # and sweeps: +0.4 / -0.0 (digits; +1.8 / -0.1 pooled std), -0.1 / -0.1 (synthetic), -0.4 /
    # -0.2 (npz); under stress (collapse weight 5, lr 4x) +0.3 / +0.4, 0.6 / 1.0 pooled std.
    # It costs the step a second cotangent and a Hutchinson refresh, and the program ~10 s of
    # compile. Switched back on at the new defaults (digits_defaults_now.md): -0.2 / -0.3.
    config.mi.curvature = False
    config.mi.curv_every = 20
    config.mi.curv_probes = 2
    config.mi.curv_decay = 0.9
    config.mi.quantile = 0.9
    config.mi.mask_mode = "soft"
    config.mi.mask_beta = 1.0
    # Certified Neumann hypergradient on the meta-parameters (§3.4).
    # Under stress (digits VALID, phi mis-set to strength 0.3 and weights 10, meta every 10 steps
    # at lr 0.1) the meta-update raised the strength to ~0.93 but the loss weights to 280-640,
    # and cost 18 points of missing Avg (docs/results.md); at these defaults it barely moves phi.
    # Off at the old defaults on VALID (*_defaults.md): -0.2 / -0.1 digits, +0.0 / -0.0
    # synthetic, +0.2 / +0.2 npz; under stress (old defaults, 500 steps) the strength alone paid
    # +3.2 / +1.0 (3.1 / 1.3 pooled std), so it stayed on, every 50 steps at lr 0.05.
    # Off since issue 15's session (results/selection/*_meta_cadence.md, VALID, today's defaults,
    # 3 seeds; hetero npz 6; margin of missing Avg zero / mask against no meta-update): at the
    # configured strength, every 50 steps at lr 0.05 gives -0.2 / -0.1 digits, +0.0 / -0.0
    # synthetic, +0.1 / +0.1 npz; every 100 at lr 0.1 -0.4 / -0.1, +0.0 / -0.0, +0.4 / +0.3
    # (+0.9 / +0.7, 1.6 pooled std, on seeds 0-2; seeds 3-5 did not repeat it). With the
    # strength mis-set to 0.3, every 50 at lr 0.05 moves it only to ~0.47 in 1500 steps and pays
    # +0.5 / -0.6, +0.1 / -0.0, -0.1 / -0.0; every 10 at lr 0.1 brings it back to ~0.98 and pays
    # +5.2 / +0.1 (12.2 / 0.7 pooled std), +0.8 / -0.3, +2.3 / +0.0 (1.0 / 0.0): under `zero`
    # only. So it fails the rule (at mi.regularizer) at every cadence tried, and it was the step's
    # largest cost (139 ms per update on digits: 2.8 ms of a 7.9 ms step at every 50; its own
    # program compiles in ~15 s). On, it runs at the cadence that does recover a mis-set
    # strength (every 10, lr 0.1).
    config.mi.meta = False
    # Which components of phi the meta-update moves (comma-separated: strength, reg_weight,
    # rec_weight); the others stay at their configured values. Chosen on VALID
    # (results/selection/*_meta_params.md, 3 seeds, missing Avg zero / mask against no
    # meta-update): all of phi -0.9 / -0.9 on digits, +0.1 / -0.0 on synthetic, +0.2 / +0.3 on
    # hetero; the strength alone -0.2 / -0.1, +0.0 / -0.0, +0.2 / +0.2 (all within one pooled
    # std). Under stress (digits_stress.md, phi mis-set) all of phi cost 18 points and the
    # strength alone paid +3.2 / +1.0: "strength".
    config.mi.meta_params = "strength"
    config.mi.meta_every = 10
    config.mi.meta_lr = 0.1
    config.mi.neumann_terms = 10
    config.mi.damping = 1.0
    # Raise the damping by the negative curvature Lanczos finds (hypergrad.neumann_inverse_hvp):
    # away from an optimum H is indefinite and a fixed damping leaves the series divergent.
    config.mi.floor_curvature = True
    # Lanczos iterations for the spectrum the certificate needs.
    config.mi.num_lanczos_iters = 10
    # Deprecated: config.mi.num_lanczos_iters (it counts Lanczos, not power, iterations).
    config.mi.power_iters = None

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 256
    # The final evaluation: "robustness" (eval.json's whole protocol: missing conditions under both
    # protocols, random missing, corruption), "missing" (full and the missing conditions only) or
    # "full" (full-modality metrics only; quick runs).
    config.eval.protocol = "robustness"
    # The split of the final evaluation: "test" (eval.json) or "valid" (eval_valid.json, for
    # choosing settings without touching test; experiments.sweep).
    config.eval.split = "test"
    # Evaluate the params that scored best on valid (True), or the last ones (False).
    config.eval.keep_best = True

    # Write a jax.profiler trace of this many steps (after the first, compiling one) into
    # <workdir>/profile, for TensorBoard or Perfetto; 0: no trace.
    config.profile_steps = 0
    # Batches read and put on the devices ahead of the step by a reader thread; 0: read in the
    # loop itself, between dispatches. Dispatch is asynchronous, so the loop already reads and
    # puts batch t+1 while step t computes; on a 2-core host the thread's wake-ups and GIL
    # hand-offs cost more than they hide (synthetic, erm: 1.83 ms a step reading in the loop,
    # 1.92 with the thread, 1.75 with a thread that only hands over placed batches; issue 15,
    # docs/performance.md).
    config.prefetch_batches = 0

    config.dataset = _dataset(preset)

    if preset == "digits":
        # Chosen on the VALID split with erm (issue 14; best-on-valid checkpoint, every 250 steps;
        # valid accuracy, mean over seeds 0-1 unless marked (3) for seeds 0-2; 270 valid
        # examples, so 0.004 is one example). Start: mlp, lr 2e-3, dropout 0, standardize: 0.974.
        # - dropout 0 / 0.1 / 0.3 / 0.5: 0.974 / 0.972 / 0.976 / 0.978 (0.5: 0.978 but train
        #   loss 10x higher); weight decay 1e-4 / 1e-2 / 1e-1 at dropout 0.3: 0.976 / 0.976 /
        #   0.978 (no effect; kept 1e-4).
        # - at dropout 0.3: lr 1e-3 / 2e-3 / 5e-3: 0.967 / 0.976 / 0.985 (3: 0.984); 3000 steps
        #   0.983; d 128 / d_h 256 0.963; input_norm 0.944 (a LayerNorm per image row throws away
        #   the row's ink); encoder conv 0.985 (3: 0.988).
        # - conv, dropout 0.3, lr 5e-3 (3): 0.990 standardized, 0.988 with normalize none.
        # Chosen: conv, dropout 0.3, lr 5e-3, standardize, 1500 steps.
        config.num_steps = 1500
        config.model.encoder = "conv"
        config.model.dropout = 0.3
        config.optimizer.lr = 5e-3
    elif preset == "npz":
        # Chosen on the VALID split of the full heterogeneous fixture (python -m
        # data_pipelines.hetero; 359 valid examples) with erm, mean over seeds 0-1, best-on-valid
        # checkpoint: base (dropout 0, lr 2e-3) 0.987; dropout 0.3: 0.989; dropout 0.3 and
        # lr 5e-3: 0.993; with weight decay 1e-2: 0.990; dropout 0.3 for 1500 steps: 0.986.
        # Without standardization erm stays at chance (0.121: the 1e4-scale view swamps the
        # others); input_norm with dropout 0.3 rescues it to 0.983.
        config.model.dropout = 0.3
        config.optimizer.lr = 5e-3
    elif preset in ("cmu_mosi", "cmu_mosei", "iemocap"):
        config.model.encoder = "transformer"
        config.model.fusion = "attention"
        config.batch_size = 32
        config.optimizer.lr = 1e-3
    if "tiny" in modifiers:
        # The MLP encoder compiles in a fraction of the conv's time; tiny runs test plumbing.
        if preset == "digits":
            config.model.encoder = "mlp"
        config.num_steps = 30
        config.log_every = 10
        config.eval_every = 15
        config.checkpoint_every = 15
        config.optimizer.warmup_steps = 5
        config.model.d = 16
        config.model.d_h = 32
        config.eval.batch_size = 128
        config.dataset.num_train = 256
        config.dataset.num_valid = 128
        config.dataset.num_test = 128
    return config
