"""The planted bugs of ``python -m tests.plant_bugs``: plausible slips, each the smallest edit.

Each :class:`~tests.plant_bugs.Bug` names the file, the text it replaces (it
must occur exactly once: ``tests/test_planted_bugs_fresh.py`` checks this in
CI), the replacement, the tests that should catch it (files or node ids, kept
targeted so one bug runs in well under a minute in the interpreter) and what
a user would see if it shipped. An entry that survives stays in the list only
with its ``why`` saying why that is acceptable.
"""

from __future__ import annotations

from tests.plant_bugs import Bug

AREAS = ("kernels", "cuda-glue", "reference", "ops", "wiring", "timm-hf", "loop",
         "checkpoints", "data")

REF = "heba_kernels/reference.py"
WIRING = "heba/clip/wiring.py"
CKPT = "heba/clip/checkpoints.py"
SAMPLING = "heba/data/sampling.py"
COOP = "heba/data/coop.py"
VISION = "heba/data/vision.py"
STEP = "heba/train/step.py"
EVAL = "heba/train/evaluate.py"

T_REF = "tests/test_reference.py"
T_WIRING = "tests/test_clip_wiring.py"
T_CKPT = "tests/test_clip_checkpoints.py"
T_COOP = "tests/test_data_coop.py"
T_VISION = "tests/test_data_vision.py"
T_HOLES = "tests/test_planted_holes.py"

REFERENCE = [
    Bug("ref-gelu-tanh", "reference", REF,
        "z = F.conv2d(F.gelu(v), up_weight)",
        'z = F.conv2d(F.gelu(v, approximate="tanh"), up_weight)',
        (f"{T_REF}::test_visual_matches_independent_float64",),
        "the tanh GELU instead of the exact one: every visual output off by ~1e-3"),
    Bug("ref-prefix-ignored", "reference", REF,
        "prefix, t = xb[:, :P], xb[:, P:]",
        "prefix, t = xb[:, :1], xb[:, 1:]",
        (f"{T_REF}::test_prefix_tokens_pass_through_untouched",
         f"{T_REF}::test_visual_matches_independent_float64"),
        "num_prefix_tokens ignored (one class token assumed): register tokens adapted"),
    Bug("ref-grid-hw-swap", "reference", REF,
        "img = t.transpose(1, 2).reshape(B, D, H, W)",
        "img = t.transpose(1, 2).reshape(B, D, W, H)",
        (f"{T_REF}::test_visual_matches_independent_float64",),
        "the grid read as W x H: identical on square grids, a wrong stencil on others"),
    Bug("ref-grad-rule-dropped", "reference", REF,
        "return g * ctx.scale, None",
        "return g, None",
        (f"{T_REF}::test_visual_matches_independent_float64",
         f"{T_REF}::test_text_matches_independent_float64"),
        "GradScale passes g unscaled: x's gradient no longer the true gradient"),
    Bug("ref-low-rank-no-down-bias", "reference", REF,
        "z = F.linear(F.gelu(F.linear(x, down_weight, down_bias)), up_weight, up_bias)",
        "z = F.linear(F.gelu(F.linear(x, down_weight)), up_weight, up_bias)",
        (f"{T_REF}::test_low_rank_matches_independent_float64",),
        "the low-rank down projection's bias dropped"),
    Bug("ref-text-no-residual-in-norm", "reference", REF,
        "return F.layer_norm(t + z, (D,), norm_weight, norm_bias, eps)\n\n"
        "    return _scaled_residual(x",
        "return F.layer_norm(z, (D,), norm_weight, norm_bias, eps)\n\n"
        "    return _scaled_residual(x",
        (f"{T_REF}::test_text_matches_independent_float64",),
        "text adapter normalises up(gelu(down(t))) without the inner residual t"),
    Bug("ref-visual-eps-ignored", "reference", REF,
        "z = z.reshape(B, D, H * W).transpose(1, 2)                # [B, HW, D]\n"
        "        return F.layer_norm(t + z, (D,), norm_weight, norm_bias, eps)",
        "z = z.reshape(B, D, H * W).transpose(1, 2)                # [B, HW, D]\n"
        "        return F.layer_norm(t + z, (D,), norm_weight, norm_bias, 1e-5)",
        (f"{T_REF}::test_eps_is_used",),
        "the visual LayerNorm ignores eps (always 1e-5)"),
]

WIRING_BUGS = [
    Bug("wiring-eps", "wiring", WIRING,
        "rescale_param_grad=rescale_param_grad, backend=backend)",
        "rescale_param_grad=rescale_param_grad, backend=backend, eps=1e-6)",
        (f"{T_WIRING}::test_heba_matches_spec_block_equations",),
        "the wiring builds adapters with LayerNorm eps 1e-6 instead of the published 1e-5"),
    Bug("wiring-grid-hw-swap", "wiring", WIRING,
        "return None if grid is None else (int(grid[0]), int(grid[1]))",
        "return None if grid is None else (int(grid[1]), int(grid[0]))",
        (T_WIRING,),
        "the visual adapters of a non-square model (e.g. 224x320 input) get a W x H grid"),
    Bug("wiring-att-after-ln2", "wiring", WIRING,
        'replaced.append((block, "ln_1", block.ln_1))\n'
        "            block.ln_1 = AdaptedOutput(block.ln_1, att, policy)",
        'replaced.append((block, "ln_2", block.ln_2))\n'
        "            block.ln_2 = AdaptedOutput(block.ln_2, att, policy)",
        (f"{T_WIRING}::test_heba_matches_spec_block_equations",),
        "the attention adapter wraps ln_2 (before the MLP) instead of ln_1"),
    Bug("wiring-scale-factor", "wiring", WIRING,
        "scale_factor: float = 2.25,",
        "scale_factor: float = 2.5,",
        (f"{T_WIRING}::test_scale_policy",),
        "slow-fast multiplier 2.5 instead of the published 2.25"),
    Bug("wiring-slow-fast-inverted", "wiring", WIRING,
        "self._rng.random() >= self.slow_fast_ratio",
        "self._rng.random() < self.slow_fast_ratio",
        (f"{T_WIRING}::test_scale_policy",),
        "the fast scale drawn 80% of the time instead of 20%"),
    Bug("wiring-every-offset", "wiring", WIRING,
        "for i in range(every - 1, len(tr.resblocks), every):",
        "for i in range(0, len(tr.resblocks), every):",
        (f"{T_WIRING}::test_adaptertune_placement",),
        "AdapterTune every=2 adapts blocks 0, 2 instead of 1, 3"),
    Bug("wiring-end-exclusive", "wiring", WIRING,
        "return range(start - 1, end)",
        "return range(start - 1, end - 1)",
        (f"{T_WIRING}::test_heba_matches_spec_block_equations",),
        "the last adapted layer (end, 1-based inclusive) left out"),
    Bug("wiring-per-block-parity", "wiring", WIRING,
        "if self._calls % 2 == 0:",
        "if self._calls % 2 == 1:",
        ("tests/test_train_recipe.py::test_slow_fast_scale_drawn_once_per_block",),
        "per-block slow-fast: the MLP adapter draws and the next block's attention reuses it"),
    Bug("wiring-eot-pooling", "wiring", WIRING,
        "x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]",
        "x = x[:, -1]",
        (f"{T_WIRING}::test_encode_text_truncation_equals_full",),
        "truncated text pooled at the last kept token, right only for the longest prompt"),
    Bug("wiring-slot-zero-based", "checkpoints", WIRING,
        "slots[i + 1] = HeBALayer(att, mlp)",
        "slots[i] = HeBALayer(att, mlp)",
        (f"{T_CKPT}::test_heba_keys_are_the_published_keys",),
        "adapter i stored in slot i-1: published 1-based checkpoints load one layer off"),
]

CHECKPOINTS = [
    Bug("ckpt-module-prefix-kept", "checkpoints", CKPT,
        'k = k[len("module."):] if k.startswith("module.") else k',
        "k = k",
        (T_CKPT, T_HOLES),
        "a checkpoint saved from a DDP-wrapped learner (module.*) no longer loads"),
    Bug("ckpt-tk-prompts-kept", "checkpoints", CKPT,
        'IGNORED = ("tk_prompts",)',
        "IGNORED = ()",
        (T_CKPT,),
        "published checkpoints fail to load: tk_prompts reported as an unknown key"),
    Bug("ckpt-latest-lexicographic", "checkpoints", CKPT,
        'max(tagged, key=lambda f: int(f.rsplit("-", 1)[1]))',
        "max(tagged)",
        (T_CKPT, T_HOLES),
        "a run folder with model.pth.tar-5 and -10 evaluates epoch 5"),
    Bug("ckpt-write-in-place", "checkpoints", CKPT,
        "        write(tmp)\n        os.replace(tmp, path)",
        "        write(path)\n        os.unlink(tmp)",
        (f"{T_CKPT}::test_own_checkpoint_roundtrip", T_HOLES),
        "checkpoints written in place: a crash mid-write leaves a truncated file"),
    Bug("ckpt-layout-end", "checkpoints", CKPT,
        "start=min(every), end=max(every))",
        "start=min(every), end=len(every))",
        (f"{T_CKPT}::test_evaluate_cli_loads_published_checkpoint", T_HOLES),
        "a published checkpoint adapting layers 3..12 read as layers 3..10"),
]

DATA = [
    Bug("fewshot-equal-size-group", "data", SAMPLING,
        "if len(group) >= shots else group",
        "if len(group) > shots else group",
        (T_COOP, T_HOLES),
        "a class with exactly `shots` images kept in order without a draw: later classes "
        "draw other images than Dassl"),
    Bug("subsample-floor", "data", SAMPLING,
        "m = math.ceil(len(labels) / 2)",
        "m = len(labels) // 2",
        (f"{T_COOP}::test_subsample_takes_labels_of_first_split_and_relabels",),
        "odd class counts: base gets floor(n/2) classes (Pets: 18 base instead of 19)"),
    Bug("subsample-no-relabel", "data", SAMPLING,
        "relabel = {old: new for new, old in enumerate(selected)}",
        "relabel = {old: old for old in selected}",
        (f"{T_COOP}::test_subsample_takes_labels_of_first_split_and_relabels",),
        "new classes keep their original labels (m..n-1): the head indexes past the classes"),
    Bug("coop-val-shots-uncapped", "data", COOP,
        "val = fewshot(val, min(shots, 4), rng)",
        "val = fewshot(val, shots, rng)",
        (f"{T_COOP}::test_split_file_dataset_is_published_split",),
        "16-shot runs validate on 16 instead of 4 images per class"),
    Bug("coop-val-reseeded", "data", COOP,
        "val = fewshot(val, min(shots, 4), rng)",
        "val = fewshot(val, min(shots, 4), random.Random(seed))",
        (f"{T_COOP}::test_split_file_dataset_is_published_split",),
        "the val draw restarts the generator instead of continuing after the train draw"),
    Bug("coop-fgvc-first-word", "data", COOP,
        'variant = " ".join(words)',
        "variant = words[0]",
        (f"{T_COOP}::test_fgvc_aircraft_labels_follow_variants_txt",),
        "FGVC variants with a space ('Cessna 172') cut to their first word"),
    Bug("coop-listdir-sorted", "data", COOP,
        'return [f for f in os.listdir(path) if not f.startswith(".")]',
        'return sorted(f for f in os.listdir(path) if not f.startswith("."))',
        (f"{T_COOP}::test_imagenet_sorted_folders_listdir_order_val_is_test",),
        "ImageNet class folders listed sorted: random.sample picks other images than Dassl"),
    Bug("vision-val-from-end", "data", VISION,
        "return perm[n_val:], perm[:n_val]",
        "return perm[:n - n_val], perm[n - n_val:]",
        (f"{T_VISION}::test_splits_are_the_published_permutation",),
        "validation taken from the end of the permutation: other images than published"),
    Bug("vision-threeway-val-of-all", "data", VISION,
        "n_val = int((n - n_test) * val_split)",
        "n_val = int(n * val_split)",
        (f"{T_VISION}::test_splits_are_the_published_permutation",
         f"{T_VISION}::test_imagenet_r_three_way_split_or_test_folder"),
        "ImageNet-R three-way split: val a fraction of all images, not of the rest"),
]

LOOP = [
    Bug("step-positives-sort-first", "loop", STEP,
        "key = key.masked_fill(pos, 2.0)",
        "key = key.masked_fill(pos, -1.0)",
        ("tests/test_clip_cli.py::test_candidate_mask_is_the_published_set",),
        "the batch's classes take the first negative ranks: fewer negatives than published"),
    Bug("step-no-label-smoothing", "loop", STEP,
        "loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)",
        "loss = F.cross_entropy(logits, target)",
        ("tests/test_clip_cli.py::test_step_loss_is_the_published_loss",),
        "adapted-text step trains without the published label smoothing 0.1"),
    Bug("step-target-off-by-one", "loop", STEP,
        "where = torch.cumsum(mask.long(), 0) - 1",
        "where = torch.cumsum(mask.long(), 0)",
        ("tests/test_clip_cli.py::test_step_loss_is_the_published_loss",),
        "labels renumbered one past their candidate: the model learns the neighbour class"),
    Bug("eval-hm-arithmetic", "loop", EVAL,
        "return 2 * a * b / (a + b) if a + b > 0 else 0.0",
        "return (a + b) / 2 if a + b > 0 else 0.0",
        ("tests/test_train_protocols.py::test_base2novel_over_seeds", T_HOLES),
        "the reported HM is the arithmetic mean"),
    Bug("eval-novel-scale-always", "loop", EVAL,
        'policy.set_mode("novel" if split == "novel" and novel_eval == "novel"\n'
        '                                else "base")',
        'policy.set_mode("novel" if split == "novel" else "base")',
        ("tests/test_clip_cli.py", T_HOLES),
        "novel classes evaluated at 0.010 although the published code (novel_eval=base) "
        "uses the base scale"),
]

BUGS = [*REFERENCE, *WIRING_BUGS, *CHECKPOINTS, *DATA, *LOOP]
