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
ATTACH = "heba/adapters/attach.py"
POLICY = "heba/adapters/policy.py"
PUBLISHED = "heba/adapters/published.py"
CKPT = "heba/clip/checkpoints.py"
SAMPLING = "heba/data/sampling.py"
COOP = "heba/data/coop.py"
VISION = "heba/data/vision.py"
STEP = "heba/train/step.py"
EVAL = "heba/train/evaluate.py"

T_REF = "tests/test_reference.py"
T_WIRING = "tests/heba/clip/test_wiring.py"
T_POLICY = "tests/heba/adapters/test_policy.py"
T_ATTACH = "tests/heba/adapters/test_attach.py"
T_CKPT = "tests/heba/adapters/test_published.py"
T_COOP = "tests/heba/data/test_coop.py"
T_VISION = "tests/heba/data/test_vision.py"
T_STREAM = "tests/heba/adapters/test_policy_stream.py"
T_NN = "tests/heba/test_nn.py"
PIPE = "heba/data/pipeline.py"
T_PIPE = "tests/heba/data/test_pipeline.py"
T_RUNDATA = "tests/heba/train/test_data.py"
T_CHECK = "tests/heba/data/test_check.py"

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
    Bug("wiring-eps", "wiring", ATTACH,
        "rescale_param_grad=rescale_param_grad, backend=backend)",
        "rescale_param_grad=rescale_param_grad, backend=backend, eps=1e-6)",
        (f"{T_WIRING}::test_layernorm_eps_at_model_level",),
        "the wiring builds adapters with LayerNorm eps 1e-6 instead of the published 1e-5"),
    Bug("wiring-grid-hw-swap", "wiring", WIRING,
        "grid = None if grid is None else (int(grid[0]), int(grid[1]))",
        "grid = None if grid is None else (int(grid[1]), int(grid[0]))",
        (f"{T_WIRING}::test_heba_features_are_the_spec_equations",),
        "the visual adapters of a non-square model (e.g. 224x320 input) get a W x H grid"),
    Bug("wiring-att-after-ln2", "wiring", WIRING,
        'attn_input="ln_1"',
        'attn_input="ln_2"',
        (f"{T_WIRING}::test_heba_features_are_the_spec_equations",),
        "the attention adapter wraps ln_2 (before the MLP) instead of ln_1"),
    Bug("wiring-scale-factor", "wiring", POLICY,
        "scale_factor: float = 2.25,",
        "scale_factor: float = 2.5,",
        (f"{T_POLICY}::test_scale_policy",),
        "slow-fast multiplier 2.5 instead of the published 2.25"),
    Bug("wiring-slow-fast-inverted", "wiring", POLICY,
        "torch.where(bits >= self._threshold(), hi, lo)",
        "torch.where(bits >= self._threshold(), lo, hi)",
        (f"{T_POLICY}::test_scale_policy",),
        "the fast scale drawn 80% of the time instead of 20%"),
    Bug("wiring-every-ignored", "wiring", ATTACH,
        "range(0, len(blocks), every):",
        "range(0, len(blocks)):",
        (f"{T_WIRING}::test_adaptertune_published_placement_and_alpha",
         f"{T_ATTACH}::test_adaptertune_follows_blocks_every_nth"),
        "AdapterTune every=2 adapts every block"),
    Bug("wiring-end-exclusive", "wiring", ATTACH,
        "return range(start - 1, end)",
        "return range(start - 1, end - 1)",
        (f"{T_WIRING}::test_heba_features_are_the_spec_equations",
         f"{T_ATTACH}::test_heba_goes_where_the_sites_say"),
        "the last adapted layer (end, 1-based inclusive) left out"),
    Bug("wiring-per-block-draw-not-shared", "wiring", POLICY,
        "return self._current[tower][block][pos if not self.per_block else 0]",
        "return self._current[tower][block][pos]",
        (f"{T_STREAM}::test_one_draw_per_block_and_tower_shared_by_both_adapters",
         "tests/heba/train/test_config.py::test_slow_fast_scale_drawn_once_per_block"),
        "per-block slow-fast: a block's MLP adapter draws its own scale instead of sharing "
        "the attention adapter's (the published code draws once per block)"),
    Bug("policy-counter-not-advanced", "wiring", POLICY,
        "        self._current[tower] = torch.where(bits >= self._threshold(), hi, lo)   "
        "# [n_blocks, 2]\n        self._counters[t].add_(1)\n",
        "        self._current[tower] = torch.where(bits >= self._threshold(), hi, lo)   "
        "# [n_blocks, 2]\n",
        (f"{T_STREAM}::test_device_draws_match_host_reimplementation",
         f"{T_POLICY}::test_scale_policy"),
        "the device slow-fast stream never advances: every forward draws the same scales"),
    Bug("wiring-eot-pooling", "wiring", WIRING,
        "x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]",
        "x = x[:, -1]",
        (f"{T_WIRING}::test_encode_text_truncation_equals_full",),
        "truncated text pooled at the last kept token, right only for the longest prompt"),
    Bug("wiring-slot-zero-based", "checkpoints", ATTACH,
        "slots[i + 1] = HeBALayer(att, mlp)",
        "slots[i] = HeBALayer(att, mlp)",
        (f"{T_CKPT}::test_heba_keys_are_the_published_keys",),
        "adapter i stored in slot i-1: published 1-based checkpoints load one layer off"),
]

CHECKPOINTS = [
    Bug("ckpt-module-prefix-kept", "checkpoints", PUBLISHED,
        'return key[len("module."):] if key.startswith("module.") else key',
        "return key",
        ("tests/heba/train/test_loop.py::test_module_prefixed_published_checkpoint_loads",),
        "a checkpoint saved from a DDP-wrapped learner (module.*) no longer loads"),
    Bug("ckpt-tk-prompts-kept", "checkpoints", PUBLISHED,
        'IGNORED = ("tk_prompts",)',
        "IGNORED = ()",
        (T_CKPT,),
        "published checkpoints fail to load: tk_prompts reported as an unknown key"),
    Bug("ckpt-latest-lexicographic", "checkpoints", CKPT,
        'max(tagged, key=lambda f: int(f.rsplit("-", 1)[1]))',
        "max(tagged)",
        (T_CKPT, "tests/heba/clip/test_checkpoints.py"),
        "a run folder with model.pth.tar-5 and -10 evaluates epoch 5"),
    Bug("ckpt-write-in-place", "checkpoints", CKPT,
        "        make(tmp)\n        os.replace(tmp, path)",
        "        make(path)",
        ("tests/heba/train/test_run_folder.py::"
         "test_atomic_write_keeps_the_old_file_when_writing_fails",
         "tests/heba/train/test_run_folder.py"),
        "checkpoints written in place: a crash mid-write leaves a truncated file"),
    Bug("ckpt-layout-end", "checkpoints", PUBLISHED,
        "start=min(every), end=max(every))",
        "start=min(every), end=len(every))",
        (f"{T_CKPT}::test_evaluate_cli_loads_published_checkpoint",
         "tests/heba/clip/test_checkpoints.py::test_published_layout_reads_first_and_last_layer"),
        "a published checkpoint adapting layers 3..12 read as layers 3..10"),
]

DATA = [
    Bug("fewshot-equal-size-group", "data", SAMPLING,
        "if len(group) >= shots else group",
        "if len(group) > shots else group",
        (T_COOP, "tests/heba/data/test_sampling.py"),
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
    Bug("vision-flowers-train-only", "data", VISION,
        'parts = [D.Flowers102(root, split) for split in ("train", "val")]',
        'parts = [D.Flowers102(root, split) for split in ("train",)]',
        (f"{T_VISION}::test_flowers102_trains_on_train_plus_val",),
        "Flowers102 trains on its train split only (the published code uses train + val)"),
    Bug("folder-train-images-in-test", "data", "heba/data/folder.py",
        "chosen = {it.path for it in train} if single else set()",
        "chosen = set()",
        ("tests/heba/train/test_recipe.py::test_folder_split_shots_by_seed",),
        "a single ImageFolder tree: the few-shot training images are also test images"),
    Bug("folder-test-per-class-off-by-one", "data", "heba/data/folder.py",
        "count[it.label] <= test_per_class",
        "count[it.label] < test_per_class",
        ("tests/heba/data/test_folder.py::test_folder_test_per_class_keeps_that_many",),
        "--test-per-class N keeps N - 1 test images per class"),
    Bug("pipeline-box-aspect-inverted", "data", PIPE,
        "w = int(round(math.sqrt(target * aspect)))",
        "w = int(round(math.sqrt(target / aspect)))",
        (T_PIPE,),
        "crop boxes of another shape than torchvision's RandomResizedCrop draws"),
    Bug("pipeline-order-no-base-seed", "data", PIPE,
        "    torch.empty((), dtype=torch.int64).random_(generator=g)    # the iterator's base seed\n",
        "",
        (T_PIPE, f"{T_RUNDATA}::test_demo_tensors_batched_as_todays_loader"),
        "the epoch's sample order is not the one the published-style loader drew"),
    Bug("pipeline-fast-flip-ignored", "data", PIPE,
        "return (out.flip(-1) if flip else out).contiguous()",
        "return out.contiguous()",
        (f"{T_PIPE}::test_same_boxes_and_images_as_today",),
        "the fast pipeline never flips: half the augmentation of the published recipe lost"),
    Bug("pipeline-normalise-no-255", "data", PIPE,
        ".to(dtype).div_(255)",
        ".to(dtype)",
        (f"{T_PIPE}::test_normalize_on_device_is_to_tensor_then_normalize",),
        "uint8 batches normalised without the 1/255 of ToTensor: inputs 255x too large"),
    Bug("loader-epoch-generator-not-reseeded", "data", "heba/train/data.py",
        "        self.generator.manual_seed(shuffle)\n",
        "",
        (f"{T_RUNDATA}::test_random_transforms_in_workers_follow_seed_and_epoch",),
        "random transforms in workers seeded from a generator not reseeded per epoch: a "
        "resumed run draws other augmentations"),
    Bug("testcrops-key-ignores-mtime", "data", "heba/data/testcrops.py",
        "\\0{st.st_size}\\0{st.st_mtime_ns}",
        "\\0{st.st_size}",
        ("tests/heba/data/test_testcrops.py::test_over_the_memory_cap_a_cache_file_is_reused",),
        "an image rewritten in place is evaluated from its old cached crop"),
    Bug("check-jpeg-end-not-checked", "data", "heba/data/check.py",
        '_ENDS = {"JPEG": _jpeg_end, ',
        "_ENDS = {",
        (f"{T_CHECK}::test_fast_check_names_what_is_wrong",),
        "the fast check decodes every JPEG in full: no faster than the full check"),
    Bug("loader-same-order-every-epoch", "data", "heba/train/data.py",
        "return seed * 7_919 + epoch, seed * 100_003 + epoch * 1_009 + rank",
        "return seed * 7_919, seed * 100_003 + epoch * 1_009 + rank",
        (f"{T_RUNDATA}::test_demo_tensors_batched_as_todays_loader",),
        "every epoch sees the images in the same order"),
    Bug("pipeline-ddp-epoch-not-set", "data", PIPE,
        "        s.set_epoch(epoch)\n",
        "",
        (f"{T_PIPE}::test_distributed_order_is_distributed_sampler",),
        "under DDP every epoch sees the same split and order of the images"),
    Bug("loader-drop-last-ignored", "data", "heba/train/data.py",
        "drop = cfg.drop_last and len(ds) >= cfg.batch_size * world",
        "drop = False",
        (f"{T_RUNDATA}::test_demo_tensors_batched_as_todays_loader",),
        "the last partial batch trained on, unlike Dassl (another number of steps per epoch)"),
    Bug("check-empty-not-named", "data", "heba/data/check.py",
        '        return "empty file"\n',
        '        pass\n',
        (f"{T_CHECK}::test_fast_check_names_what_is_wrong",),
        "an empty file reported as an unidentified image, not as empty"),
]

LOOP = [
    Bug("step-positives-sort-first", "loop", STEP,
        "key = key.masked_fill(pos, 2.0)",
        "key = key.masked_fill(pos, -1.0)",
        ("tests/heba/train/test_recipe.py::test_candidate_mask_is_the_published_set",),
        "the batch's classes take the first negative ranks: fewer negatives than published"),
    Bug("step-candidate-slots-too-few", "loop", STEP,
        "return min(n_classes, batch * (1 + neg_per_class))",
        "return min(n_classes, batch * neg_per_class)",
        ("tests/heba/train/test_step.py::test_candidate_slots_hold_the_published_set",
         "tests/heba/train/test_step.py::test_static_step_equals_published_step"),
        "static candidate slots sized without the positives: some candidates are cut off"),
    Bug("step-no-label-smoothing", "loop", STEP,
        "loss = masked_cross_entropy(logits, target, valid, self.label_smoothing)",
        "loss = masked_cross_entropy(logits, target, valid)",
        ("tests/heba/train/test_recipe.py::test_step_loss_is_the_published_loss",),
        "adapted-text step trains without the published label smoothing 0.1"),
    Bug("ce-smoothing-over-all-classes", "loop", STEP,
        "smooth = -logp.masked_fill(~valid, 0.0).sum(dim=-1) / valid.sum()",
        "smooth = -logp.masked_fill(~valid, 0.0).sum(dim=-1) / valid.shape[0]",
        ("tests/heba/train/test_step.py::test_masked_cross_entropy_is_cross_entropy",
         "tests/heba/train/test_recipe.py::test_step_loss_is_the_published_loss"),
        "label smoothing spread over all C classes, not the K candidates: a smaller smoothing"),
    Bug("step-target-off-by-one", "loop", STEP,
        "pos = torch.cumsum(m, 0) - 1                                  # rank among candidates",
        "pos = torch.cumsum(m, 0)                                      # rank among candidates",
        ("tests/heba/train/test_recipe.py::test_step_loss_is_the_published_loss",
         "tests/heba/train/test_step.py::test_candidate_slots_hold_the_published_set"),
        "labels renumbered one past their candidate: the model learns the neighbour class"),
    Bug("eval-hm-arithmetic", "loop", "heba/train/metrics.py",
        "return 2 * a * b / (a + b) if a + b > 0 else 0.0",
        "return (a + b) / 2 if a + b > 0 else 0.0",
        ("tests/heba/train/test_loop.py::test_harmonic_mean_by_hand",),
        "the reported HM is the arithmetic mean"),
    Bug("eval-novel-scale-always", "loop", EVAL,
        'policy.set_mode("novel" if split == "novel" and novel_eval == "novel"\n'
        '                                else "base")',
        'policy.set_mode("novel" if split == "novel" else "base")',
        ("tests/heba/train/test_loop.py::test_evaluate_scales_accuracies_and_hm",
         "tests/heba/train/test_loop.py::test_published_default_evaluates_novel_at_base_scale"),
        "novel classes evaluated at 0.010 although the published code (novel_eval=base) "
        "uses the base scale"),
]

CUDA_OPS = "heba_kernels/cuda_ops.py"
T_CUDA = "tests/test_cuda.py"

TIMM_HF = [
    Bug("timm-register-tokens-ignored", "timm-hf", "heba/timm.py",
        'num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))',
        "num_prefix_tokens=1)",
        ("tests/heba/test_timm.py::test_heba_computes_the_block_equations",),
        "timm ViTs with register tokens: the registers enter the HeBA patch grid"),
    Bug("timm-grid-hw-swap", "timm-hf", "heba/timm.py",
        "grid=(int(grid[0]), int(grid[1]))",
        "grid=(int(grid[1]), int(grid[0]))",
        ("tests/heba/test_timm.py::test_heba_computes_the_block_equations",),
        "non-square timm grids (e.g. 224x320 input) read as W x H"),
    Bug("timm-every-from-last", "timm-hf", ATTACH,
        "for i in range(0, len(blocks), every):",
        "for i in range(every - 1, len(blocks), every):",
        ("tests/heba/test_timm.py::test_adaptertune_computes_the_published_blocks",),
        "AdapterTune on timm: blocks every-1, 2*every-1 instead of the published i % every == 0"),
    Bug("hf-every-from-last", "timm-hf", ATTACH,
        "for i in range(0, len(blocks), every):",
        "for i in range(every - 1, len(blocks), every):",
        ("tests/heba/test_hf.py::test_adaptertune_computes_the_block_equations",),
        "AdapterTune on Hugging Face CLIP: other layers than i % every == 0"),
    Bug("hf-att-after-layer-norm2", "timm-hf", "heba/hf.py",
        'attn_input="layer_norm1"',
        'attn_input="layer_norm2"',
        ("tests/heba/test_hf.py::test_heba_computes_the_block_equations",),
        "the attention adapter of Hugging Face CLIP wraps layer_norm2 instead of layer_norm1"),
]

CUDA_GLUE = [
    Bug("glue-visual-grid-swap", "cuda-glue", CUDA_OPS,
        "int(grid[0]),\n                               int(grid[1]),",
        "int(grid[1]),\n                               int(grid[0]),",
        (f"{T_CUDA}::test_glue_on_cpu_stand_ins",),
        "the CUDA visual op gets (W, H): wrong stencil on non-square grids"),
    Bug("glue-saved-u-g-swapped", "cuda-glue", CUDA_OPS,
        "_out, u, g, z, mean, rstd = output\n    ctx.save_for_backward(x, down_weight, mid",
        "_out, g, u, z, mean, rstd = output\n    ctx.save_for_backward(x, down_weight, mid",
        (f"{T_CUDA}::test_glue_on_cpu_stand_ins",),
        "the visual backward gets u and g in each other's place: wrong weight gradients"),
    Bug("glue-text-rescale-forced", "cuda-glue", CUDA_OPS,
        "ctx.args = (scale, rescale_param_grad)",
        "ctx.args = (scale, True)",
        (f"{T_CUDA}::test_glue_on_cpu_stand_ins",),
        "rescale_param_grad=False ignored by the CUDA text backward"),
    Bug("glue-2d-transposed-in-place", "cuda-glue", CUDA_OPS,
        "(x.dim() >= 3 and x.transpose(0, 1).is_contiguous())",
        "x.transpose(0, 1).is_contiguous()",
        (f"{T_CUDA}::test_prepare_x_layouts",),
        "a transposed 2-D x (D not the last memory axis) passed to the kernels as is"),
]

VIS = "heba_kernels/heba_visual.py"
TXT = "heba_kernels/heba_text.py"
LR = "heba_kernels/low_rank.py"
COMMON = "heba_kernels/_triton_common.py"
T_TVIS = "tests/test_triton_visual.py"
T_TTXT = "tests/test_triton_text.py"
T_TLR = "tests/test_triton_low_rank.py"

KERNELS = [
    Bug("vis-eps-ignored", "kernels", VIS,
        "rstd = 1.0 / tl.sqrt(m2 / D + eps)",
        "rstd = 1.0 / tl.sqrt(m2 / D + 1e-5)",
        (f"{T_TVIS}::test_eps_with_low_variance_rows",),
        "the Triton visual LayerNorm ignores eps (always 1e-5)"),
    Bug("vis-gelu-tanh", "kernels", VIS,
        "return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))",
        "return v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))",
        (f"{T_TVIS}::test_gelu_is_exact_erf_form",),
        "the visual kernel's GELU is the tanh approximation (written as a sigmoid)"),
    Bug("vis-gelu-grad-no-pdf-term", "kernels", VIS,
        "pdf = tl.exp(-0.5 * v * v) * 0.3989422804014327          # 1 / sqrt(2 pi)\n"
        "    return cdf + v * pdf",
        "pdf = tl.exp(-0.5 * v * v) * 0.3989422804014327          # 1 / sqrt(2 pi)\n"
        "    return cdf",
        (f"{T_TVIS}::test_values_and_grads",),
        "gelu'(v) taken as Phi(v): the visual bottleneck's gradients off"),
    Bug("vis-stencil-transposed", "kernels", VIS,
        "nb = _shifted(src_ptr, p, p_mask, c, c_mask, H, W, h, k // 3 - 1, k % 3 - 1)",
        "nb = _shifted(src_ptr, p, p_mask, c, c_mask, H, W, h, k % 3 - 1, k // 3 - 1)",
        (f"{T_TVIS}::test_values_and_grads",),
        "the forward 3x3 tap k read as (column, row): the stencil of the transposed kernel"),
    Bug("vis-stencil-bottom-edge", "kernels", VIS,
        "ok = p_mask & (i >= 0) & (i < H) & (j >= 0) & (j < W)",
        "ok = p_mask & (i >= 0) & (i <= H) & (j >= 0) & (j < W)",
        (f"{T_TVIS}::test_values_and_grads",),
        "the stencil reads one row below the grid (the next image's first row) at the bottom"),
    Bug("vis-grad-rule-swapped", "kernels", VIS,
        "gs, xs = (1.0, scale) if rescale_param_grad else (scale, 1.0)",
        "gs, xs = (scale, 1.0) if rescale_param_grad else (1.0, scale)",
        (f"{T_TVIS}::test_gradient_rule",),
        "the gradient rule folded the wrong way: parameter gradients times scale, x's not"),
    Bug("vis-one-prefix-token-copied", "kernels", VIS,
        "copied by the first token block of each image.\n"
        "    if pid_t == 0:\n        for r in range(0, P):",
        "copied by the first token block of each image.\n"
        "    if pid_t == 0:\n        for r in range(0, 1):",
        (f"{T_TVIS}::test_values_and_grads",),
        "only the class token copied: register tokens come back uninitialised"),
    Bug("txt-eps-ignored", "kernels", TXT,
        "rstd = 1.0 / tl.sqrt(m2 / D + eps)",
        "rstd = 1.0 / tl.sqrt(m2 / D + 1e-5)",
        (f"{T_TTXT}::test_eps_with_low_variance_rows",),
        "the Triton text LayerNorm ignores eps"),
    Bug("txt-chunk-mean-weight", "kernels", TXT,
        "mean += delta * (n_c / tot)",
        "mean += delta * (n_c / D)",
        (T_TTXT,),
        "chunked mean merged with weight n_c / D: right only when D fits one chunk"),
    Bug("txt-bias-outside-scale", "kernels", TXT,
        "out = x + scale * (yhat * w[None, :] + b[None, :])",
        "out = x + scale * yhat * w[None, :] + b[None, :]",
        (f"{T_TTXT}::test_matches_reference",),
        "the LayerNorm bias added unscaled: out = x + scale * w * yhat + b"),
    Bug("txt-ln-bwd-no-mean-term", "kernels", TXT,
        "dy = rstd[:, None] * (g * w[None, :] - c2[:, None] - yhat * c1[:, None])\n"
        "        dy = tl.where(mask, dy, 0.0)",
        "dy = rstd[:, None] * (g * w[None, :] - yhat * c1[:, None])\n"
        "        dy = tl.where(mask, dy, 0.0)",
        (f"{T_TTXT}::test_matches_reference",),
        "LayerNorm backward without the mean(dyhat) term"),
    Bug("txt-wide-bwd-no-mean-term", "kernels", TXT,
        "dy = rstd[:, None] * (g * w[None, :] - c2[:, None] - yhat * c1[:, None])\n"
        "        tl.store(DY",
        "dy = rstd[:, None] * (g * w[None, :] - yhat * c1[:, None])\n"
        "        tl.store(DY",
        (f"{T_TTXT}::test_wide_hidden_backward_kernel",),
        "the wide-hidden text backward (ViT-L text MLP adapters) drops the mean(dyhat) term"),
    Bug("vis-partial-slot-overwritten", "kernels", VIS,
        "tl.store(dnw_slot + d, old_w + tl.sum(ga * yhat, axis=0), mask=d_mask)",
        "tl.store(dnw_slot + d, tl.sum(ga * yhat, axis=0), mask=d_mask)",
        (f"{T_TVIS}::test_values_and_grads",),
        "norm.weight's gradient slot overwritten per image: only the slot's last image counts"),
    Bug("lr-bwd-alpha-dropped", "kernels", LR,
        "du = (alpha * da) * _gelu_grad(u)",
        "du = da * _gelu_grad(u)",
        (f"{T_TLR}::test_alpha",),
        "the low-rank backward forgets alpha in the down projection's gradient"),
    Bug("lr-up-grad-unscaled", "kernels", LR,
        "atb(g2, a_buf, op_dtype, wdt, scale=float(alpha), colsum=True)",
        "atb(g2, a_buf, op_dtype, wdt, colsum=True)",
        (f"{T_TLR}::test_alpha",),
        "up.weight / up.bias gradients not multiplied by alpha"),
    Bug("atb-partials-overlap", "kernels", COMMON,
        "m_end = tl.minimum(m_start + rows_per_split, M)",
        "m_end = tl.minimum(m_start + rows_per_split + BLOCK_K, M)",
        (f"{T_TLR}::test_matches_reference",),
        "the weight-gradient reduction's token chunks overlap by one block: tokens counted twice"),
]

LOOP_PY = "heba/train/loop.py"
T_RECIPE = "tests/heba/train/test_config.py"

LOOP_RECIPE = [
    Bug("recipe-lr-never-stepped", "loop", LOOP_PY,
        "# Dassl: update_lr() after the last batch\n        tr.sched.step()",
        "# Dassl: update_lr() after the last batch\n        pass",
        (f"{T_RECIPE}::test_config_saved_beside_checkpoint_and_schedule_per_epoch",),
        "the per-epoch cosine never steps: the whole run at the initial learning rate"),
    Bug("recipe-resume-policy-rng-lost", "loop", LOOP_PY,
        'policy.load_state_dict(state["scale_policy"])',
        "pass",
        ("tests/heba/train/test_recipe.py::test_resume_continues",
         f"{T_STREAM}::test_resume_continues_the_stream"),
        "a resumed run draws other slow-fast scales than the uninterrupted one"),
    Bug("optim-warmup-off-by-one", "loop", "heba/train/optim.py",
        "return float(step + 1) / float(max(1, warm))",
        "return float(step) / float(max(1, warm))",
        ("tests/heba/train/test_classify.py::test_schedule_is_the_published_warmup_cosine",),
        "the first warm-up step at lr 0 (the published LambdaLR starts at 1 / W)"),
    Bug("config-heba-lr", "loop", "heba/train/config.py",
        "lr: float = 0.0075",
        "lr: float = 0.0035",
        (f"{T_RECIPE}::test_heba_recipe_is_the_published_one",),
        "the heba recipe's learning rate is not the published OPTIM.LR 0.0075"),
]

OPS = [
    Bug("ops-grid-product-loose", "ops", "heba/ops.py",
        "if H * W != n_grid:",
        "if H * W > n_grid:",
        ("tests/test_errors.py::test_shape_errors",
         f"{T_NN}::test_grid_with_fewer_cells_than_tokens_and_infinite_scale_are_errors"),
        "grid=(H, W) with fewer cells than patch tokens accepted: trailing tokens never adapted"),
    Bug("ops-square-grid-floor", "ops", "heba/ops.py",
        "if side * side != n_grid:",
        "if side * side > n_grid:",
        ("tests/test_errors.py::test_shape_errors",),
        "a non-square token count without grid= silently adapted as the largest square"),
    Bug("ops-inf-scale-accepted", "ops", "heba/ops.py",
        "if not math.isfinite(scale):",
        "if math.isnan(scale):",
        ("tests/test_errors.py::test_scale_float_or_0d_tensor_on_x_device",
         f"{T_NN}::test_grid_with_fewer_cells_than_tokens_and_infinite_scale_are_errors"),
        "scale=inf accepted: NaN / Inf everywhere instead of a clear error"),
    Bug("ops-tensor-scale-not-detached", "ops", "heba/ops.py",
        "return scale.detach().to(torch.float32).contiguous()",
        "return scale.to(torch.float32).contiguous()",
        ("tests/test_errors.py::test_tensor_scale_reaches_the_backend_as_0d_float32",),
        "a tensor scale that requires grad gets a gradient (SPEC: none flows to scale)"),
]

RUN_FOLDER = "heba/train/run_folder.py"
T_SET = "tests/heba/train/test_run_folder.py"

RUN_FILES = [
    Bug("set-sha-compared-with-itself", "checkpoints", RUN_FOLDER,
        'if got["sha256"] != want.get("sha256"):',
        'if got["sha256"] != got.get("sha256"):',
        (f"{T_SET}::test_damaged_set_is_named",
         "tests/heba/train/test_run_folder.py::test_checkpoint_set_changed_in_place_is_named"),
        "a checkpoint set changed after it was written resumes silently"),
    Bug("set-oldest-first", "checkpoints", RUN_FOLDER,
        "if m and os.path.isdir(os.path.join(folder, m.group(0)))), reverse=True)",
        "if m and os.path.isdir(os.path.join(folder, m.group(0)))))",
        (T_SET,),
        "killed between a set's commit and the old set's removal: --resume takes the older set"),
    Bug("run-trim-keeps-uncommitted-epoch", "checkpoints", RUN_FOLDER,
        'and rec["epoch"] <= epoch:',
        'and rec["epoch"] <= epoch + 1:',
        (T_SET,),
        "after a kill, the uncommitted epoch's metrics line stays: listed twice on resume"),
    Bug("run-publish-json-first", "checkpoints", RUN_FOLDER,
        "for name in (CKPT_NAME, CKPT_JSON):             # the JSON last",
        "for name in (CKPT_JSON, CKPT_NAME):             # the JSON last",
        (f"{T_SET}::test_write_points_are_the_expected_sequence", T_SET),
        "the finished marker (adapters.json) published before the adapters it describes"),
    Bug("preflight-resume-finished-off-by-one", "loop", "heba/train/preflight.py",
        "if latest.epoch >= cfg.epochs:",
        "if latest.epoch > cfg.epochs:",
        ("tests/heba/test_cli.py::test_resume_of_a_finished_run_says_so",),
        "--resume of a finished run trains an epoch past the end instead of saying so"),
    Bug("preflight-momentum-one", "loop", "heba/train/config.py",
        'momentum=(lambda x: 0 <= x < 1, "in [0, 1)")',
        'momentum=(lambda x: 0 <= x <= 1, "in [0, 1)")',
        ("tests/heba/test_cli.py::test_bad_value",
         "tests/heba/train/test_preflight.py::test_momentum_one_is_refused"),
        "--momentum 1 accepted: SGD never forgets a gradient and the run diverges"),
]


T_EVAL = "tests/heba/train/test_evaluate.py"
T_OWN_CKPT = "tests/heba/clip/test_checkpoints.py"
T_TIMM = "tests/heba/test_timm.py"

# What differs between training and evaluation, and loaders that are silently lenient.
EVALUATION = [
    Bug("eval-left-in-training-mode", "loop", EVAL,
        "    model.eval()\n    policy = getattr",
        "    policy = getattr",
        (f"{T_EVAL}::test_clip_evaluation_is_deterministic_and_draws_nothing",
         f"{T_EVAL}::test_clip_evaluation_is_the_published_evaluation"),
        "CLIP evaluation with the slow-fast draw on: base / novel accuracy changes from one "
        "evaluation to the next and the resumed stream moves"),
    Bug("eval-builds-graphs", "loop", EVAL,
        "@torch.no_grad()\ndef evaluate(",
        "def evaluate(",
        (f"{T_EVAL}::test_clip_evaluation_is_the_published_evaluation",),
        "CLIP evaluation records an autograd graph it never uses: memory grows with the "
        "test set's text prompts and images"),
    Bug("eval-model-left-in-eval-mode", "loop", EVAL,
        "        model.train(was)\n    if \"base\" in out",
        "    if \"base\" in out",
        (f"{T_EVAL}::test_clip_evaluation_is_the_published_evaluation",),
        "the epochs after a validation train in eval mode: no slow-fast draw, no dropout"),
    Bug("eval-novel-scale-ignored", "loop", EVAL,
        'policy.set_mode("novel" if split == "novel" and novel_eval == "novel"\n'
        '                                else "base")',
        'policy.set_mode("base")',
        (f"{T_EVAL}::test_novel_scale_evaluation_is_the_published_novel_test",),
        "--novel-eval novel evaluates the novel classes at the base scale"),
    Bug("eval-split-left-in-training-mode", "loop", EVAL,
        "    model.eval()\n    loss = torch.zeros",
        "    loss = torch.zeros",
        (f"{T_EVAL}::test_classifier_evaluation_is_deterministic_and_draws_nothing",
         f"{T_EVAL}::test_classifier_evaluation_is_the_published_evaluation"),
        "classifier test accuracy with dropout and the slow-fast draw on: a different top-1 "
        "at each evaluation"),
    Bug("eval-split-builds-graphs", "loop", EVAL,
        "@torch.no_grad()\ndef evaluate_split(",
        "def evaluate_split(",
        (f"{T_EVAL}::test_classifier_evaluation_is_the_published_evaluation",),
        "classifier evaluation records autograd graphs: memory grows with the test set"),
    Bug("published-foreign-keys-ignored", "checkpoints", PUBLISHED,
        'if k.split(".")[-1] not in IGNORED}',
        'if "adapter" in k}',
        (f"{T_CKPT}::test_published_heba_file_is_loaded_strictly",),
        "another trainer's checkpoint (a prompt learner beside adapters) loads silently"),
    Bug("own-unexpected-keys-ignored", "checkpoints", CKPT,
        "    load_adapter_state(model, state, path)",
        "    load_adapter_state(model, {k: v for k, v in state.items()\n"
        "                               if k in get_adapters(model).state_dict()}, path)",
        (f"{T_OWN_CKPT}::test_own_checkpoint_is_loaded_strictly",),
        "an adapters.safetensors of more layers than the model loads silently (evaluate, "
        "--resume), the extra adapters dropped"),
    Bug("own-json-required-fields-ignored", "checkpoints", CKPT,
        "missing = [k for k in require if k not in obj]",
        "missing = [k for k in require if k in ()]",
        (f"{T_OWN_CKPT}::test_own_configuration_lacking_a_model_field_is_refused",),
        "a configuration without its model fields evaluates with the defaults in their place"),
    Bug("timm-published-unexpected-keys-ignored", "checkpoints", "heba/timm.py",
        "check_frozen_state(own_backbone, backbone, name, check)",
        "check_frozen_state(own_backbone, {k: v for k, v in backbone.items() "
        "if k in own_backbone}, name, check)",
        (f"{T_TIMM}::test_published_file_is_loaded_strictly",),
        "a best.pt of another architecture variant (extra tensors) loads silently"),
    Bug("classifier-file-unexpected-keys-ignored", "checkpoints", "heba/train/trainable.py",
        "missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))",
        "missing, unknown = sorted(set(own) - set(state)), []",
        (f"{T_EVAL}::test_classifier_checkpoint_is_loaded_strictly",),
        "a classifier's adapters.safetensors with adapters the model lacks evaluates (or "
        "resumes) silently without them"),
]

BUGS = [*KERNELS, *REFERENCE, *OPS, *CUDA_GLUE, *WIRING_BUGS, *TIMM_HF, *CHECKPOINTS,
        *RUN_FILES, *DATA, *LOOP, *LOOP_RECIPE, *EVALUATION]

# --- protocol edge values, resume state piece by piece, the transform of each split ---------
T_PROTO = "tests/heba/train/test_protocols.py"
T_STEP = "tests/heba/train/test_step.py"
T_RESUME = "tests/heba/train/test_resume.py"
LOOP_PY = "heba/train/loop.py"

EDGES = [
    Bug("repeated-seed-accepted", "loop", "heba/train/protocols.py",
        "any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):",
        "any(s < 0 for s in seeds):",
        (f"{T_PROTO}::test_repeated_seed_is_refused_before_anything_runs",
         f"{T_PROTO}::test_repeated_seed_is_refused_for_a_classifier"),
        "--seeds 1 2 1 trains seed 1 twice into one folder and counts it twice in mean +- std"),
    Bug("text-length-cuts-the-eot", "loop", STEP,
        "    n = int(tokens.argmax(dim=-1).max()) + 1",
        "    n = int(tokens.argmax(dim=-1).max())",
        (f"{T_STEP}::test_text_length_never_cuts_before_the_last_end_of_text",),
        "a prompt whose end-of-text sits just past a multiple of 8 is cut before it: the text "
        "feature is read from the wrong token for the longest prompts"),
    Bug("slow-fast-first-block-assumed", "wiring", POLICY,
        "if (block, pos) == self._first.get(tower) or tower not in self._current:",
        "if (block, pos) == (0, 0) or tower not in self._current:",
        (f"{T_POLICY}::test_towers_adapted_from_a_later_block_redraw_every_forward",),
        "with --start > 1 the slow-fast scales are drawn once and never again: no slow-fast"),
    Bug("resume-optimizer-not-restored", "loop", LOOP_PY,
        '    tr.opt.load_state_dict(state["optimizer"])\n', "",
        (f"{T_RESUME}::test_resume_restores_the_state_each_epoch_starts_from",),
        "a resumed run restarts SGD's momentum and the learning rate: not the run it resumes"),
    Bug("resume-scheduler-not-restored", "loop", LOOP_PY,
        '    tr.sched.load_state_dict(state["scheduler"])\n', "",
        (f"{T_RESUME}::test_resume_restores_the_state_each_epoch_starts_from",),
        "a resumed run's cosine restarts from its first step after the next epoch"),
    Bug("resume-slow-fast-not-restored", "loop", LOOP_PY,
        '        policy.load_state_dict(state["scale_policy"])', "        pass",
        (f"{T_RESUME}::test_resume_restores_the_state_each_epoch_starts_from",),
        "a resumed run replays the slow-fast draws of the first epochs"),
    Bug("resume-draw-stream-restarts", "loop", "heba/train/recipe.py",
        "self.gen.manual_seed(loop.epoch_seed(self.cfg.seed, epoch, self.ctx.rank))",
        "self.gen.manual_seed(loop.epoch_seed(self.cfg.seed, epoch - self.tr.start_epoch, "
        "self.ctx.rank))",
        (f"{T_RESUME}::test_resume_continues_every_random_stream",),
        "a resumed run replays the first epoch's candidate and prompt draws"),
    Bug("resume-sampler-epoch-restarts", "loop", LOOP_PY,
        "    loader = tr.loader(epoch)",
        "    loader = tr.loader(epoch - tr.start_epoch)",
        (f"{T_RESUME}::test_resume_continues_every_random_stream",),
        "a resumed run replays the first epoch's sample order and crops"),
]

BUGS += EDGES
