__version__ = "0.1.0"
"""headscope: Jupyter-first mechanistic interpretability for Hugging Face transformers.

The public surface is flat (`from headscope import load_model, run_with_cache, hooks`) and cheap to
import: submodules load on first use, and nothing here imports triton or widgets."""
import importlib

_LAZY = {
    "models": ["load_model", "tiny_model", "model_summary", "TINY_ARCHS", "byte_tokenizer", "embedded_gguf_path", "headscope_cache_dir"],
    "arch": ["model_hook_names", "resolve_names", "model_dims", "arch_spec", "act_name", "SUPPORTED_ARCHS",
             "check_layers", "check_head", "head_out_weights", "fold_norm", "hook_shape", "post_rotary_kind"],
    "norms": ["norm_scale"],
    "dispatch": ["input_device", "execution_device", "compute_devices", "module_tensor", "MetaWeightError", "layer_devices", "DevicePlacement"],
    "tokens": ["to_inputs", "to_tokens", "to_str_tokens", "to_string", "to_single_token", "get_token_position", "token_strs", "show_tokens", "single_token_id", "single_token_ids", "pos_index", "set_prepend_bos"],
    "hooking": ["hooks", "run_with_hooks", "run_until", "StopForward", "HookContext"],
    "interventions": ["patch", "ablate", "scale", "add", "generate"],
    "decompose": ["ResidDecomposition", "head_results"],
    "cache": ["run_with_cache", "estimate_cache", "ActivationCache"],
    "results": ["ScoreGrid", "Top"],
    "weights.factored": ["FactoredMatrix"],
    "weights.circuits": ["ov_circuit", "qk_circuit", "rotary_matrix", "full_ov_circuit", "full_qk_circuit", "copying_scores", "CopyingScores",
                         "top_copied_tokens", "CopiedTokens", "composition_scores", "CompositionScores", "random_composition",
                         "communication_channels", "Channels", "NotBilinearError", "check_bilinear"],
    "weights.core": ["model_weights", "ModelWeights", "unscaled_norm", "norm_affine", "WEIGHT_NAMES"],
    "causal.lens": ["top_predictions", "logit_lens", "test_prompt", "PromptTest"],
    "heads.stats": ["attention_stats"],
    "heads.patterns": ["pattern_scores"],
    "heads.retrieval": ["retrieval_scores", "greedy_decode"],
    "heads.causal": ["ablation_scores", "head_dla"],
    "heads.niah": ["niah_grid", "NIAHGrid", "mask_retrieval_heads", "HeadMasking", "attention_influence", "AttentionInfluence",
                   "niah_tasks", "exact_copies", "head_mask_hooks", "influence_domains"],
    "heads.gradient": ["gradient_importance", "GradientImportance", "GRADIENT_SCORES"],
    "heads.census": ["head_census", "HeadCensus"],
    "heads.sinks": ["extreme_tokens", "ExtremeTokens", "MassiveAct", "SecondarySink", "active_dormant", "ActiveDormant", "default_domains"],
    "heads.gallery": ["pattern_gallery", "PatternGallery", "downsample_pattern", "distance_profile", "distance_bins"],
    "data.needles": ["needle_tasks", "repeated_tokens", "text_tokens"],
    "causal.metrics": ["logit_diff", "answer_prob", "answer_loss", "kl_div", "normalise", "agreement"],
    "causal.patching": ["activation_patching", "PatchingResult", "KINDS", "HEAD_KINDS"],
    "data.pairs": ["PromptPairs", "ioi_pairs", "fact_pairs", "single_token_names", "FACTS"],
    "causal.ablation": ["ablate_heads", "ablate_mlps", "ablate_attn", "ablate_direction", "Ablation", "DirectionAblation",
                 "component", "MODES"],
    "causal.circuits": ["circuit_eval", "CircuitEval", "faithfulness_curve", "FaithfulnessCurve", "rank_heads"],
    "causal.attribution": ["attribution_patching", "AttributionResult", "edge_attribution_patching", "EdgeScores", "frozen_params"],
    "causal.paths": ["path_patching", "PathPatchingResult", "VIAS"],
    "causal.dla": ["direct_logit_attribution", "DirectLogitAttribution"],
    "causal.recall": ["recall_mechanics", "FactualRecall"],
    "data.prompts": ["labelled_prompts", "LabelledPrompts", "DATASETS"],
    "probes.activations": ["collect_activations", "Activations"],
    "probes.probing": ["train_probes", "ProbeResult"],
    "probes.steering": ["SteeringVector", "diff_in_means", "pca_direction", "steering_vector", "steer", "steering_hooks", "scale_heads",
                 "steer_generate"],
    "probes.attention_edits": ["attn_bias_hooks", "bias_attention_to", "redistribution_hooks", "redistribute_attention",
                               "interpolation_hooks", "interpolate_attention", "INTERPOLATION_TARGETS"],
    "probes.sweep": ["steering_sweep", "SteeringSweep"],
    "probes.gact": ["gact_fit", "GACT", "steer_eval"],
    "sae.core": ["SAE", "SAEConfig", "make_sae", "save_sae", "load_sae", "SAE_ARCHS", "register_sae", "init_b_dec", "geometric_median"],
    "sae.activations": ["ActivationStore", "cache_activations", "DiskActivations"],
    "data.corpora": ["python_docs_corpus", "stdlib_corpus", "text_corpus", "token_windows"],
    "sae.relu": ["ReLUSAE"],
    "sae.topk": ["TopKSAE", "BatchTopKSAE"],
    "sae.jumprelu": ["JumpReLUSAE"],
    "sae.train": ["train_sae", "SAETrainLog", "latest_checkpoint", "resample_dead"],
    "sae.eval": ["splice_hooks", "splice", "evaluate_sae", "SAEMetrics"],
    "sae.transcoder": ["Transcoder", "TranscoderConfig", "paired_activations", "transcoder_hooks"],
    "sae.features": ["head_attribution", "top_activations", "FeatureActivations", "logit_effects", "LogitEffects",
                     "decoder_direction", "feature_hook", "feature_effect"],
    "toys": ["attn_only_model", "train_induction", "repeated_symbols", "random_symbols", "copy_losses",
             "BigramBackcopy", "bigram_backcopy", "RELU_ATTENTION", "relu_pattern", "relu_attention", "use_relu_attention",
             "backcopy_model", "train_backcopy", "SinkStats", "sink_stats"],
    "report": ["write_report", "report_html"],
    "views.attention": ["attention_explorer_html"],
    "views.heads": ["head_heatmap_html"],
    "views.recall": ["recall_html"],
    "views.taxonomy": ["taxonomy_scatter_html", "head_scatter_html"],
    "views.gallery": ["pattern_gallery_html"],
    "views.sinks": ["sink_dashboard_html", "active_dormant_html"],
    "views.niah": ["niah_grid_html", "head_masking_html", "attention_influence_html"],
    "views.style": ["caveat_html", "CAVEATS"],
    "widgets.heads": ["AttentionExplorer", "HeadHeatmap", "head_views"],
    "views.patching": ["patching_heatmap_html", "agreement_scatter_html"],
    "views.graph": ["circuit_graph_html"],
    "widgets.patching": ["PatchingHeatmap", "CircuitGraph"],
    "views.steering": ["steered_generation_html"],
    "widgets.steering": ["SteeringPlayground"],
    "views.sae": ["feature_card_html", "snmf_html", "snmf_steering_html"],
    "widgets.sae": ["FeatureBrowser"],
    "causal.cdt": ["contextual_decomposition", "CDTDecomposition", "cdt_head_contributions", "CDTHeadContributions", "cd_t_circuit", "CDTCircuit"],
    "causal.redundancy": ["drop_sublayers", "sublayer_similarity", "sublayer_redundancy", "SublayerRedundancy", "sublayer_name"],
    "causal.reuse": ["circuit_overlap", "Overlap", "circuit_reuse", "CircuitReuse", "hypergeom_sf"],
    "data.tasks": ["colored_objects_pairs", "COLORED_OBJECTS_TEMPLATE"],
    "data.requests": ["HARMFUL", "HARMLESS", "chat_prompts"],
    "causal.safety": ["refusal_mass", "refusals", "Refusals", "is_refusal", "refusal_token_ids", "safety_heads", "SafetyHeads",
                      "ablate_top", "REFUSAL_STARTS", "REFUSAL_PHRASES"],
    "probes.edit": ["component_attribution", "ComponentAttribution", "WeightEdit", "rank1_edit", "steer_to_edit", "EditSweep", "edit_sweep"],
    "sae.graph": ["AttributionGraph", "attribution_graph", "feature_cards"],
    "sae.headwise": ["HeadwiseConfig", "HeadwiseDiscreteSAE", "make_headwise", "save_headwise", "load_headwise", "headwise_activations",
                     "head_codes", "init_from_data", "train_headwise", "precision_recall", "CodeCircuit", "sae_code_circuit", "CODE_SCORES"],
    "sae.snmf": ["SNMF", "snmf", "MLPActivations", "mlp_activations", "snmf_top_activations", "component_association", "component_direction",
                 "SNMFSteering", "snmf_steering"],
    "views.feature_graph": ["attribution_graph_html", "node_card_html"],
    "widgets.graph": ["AttributionGraphWidget"],
    "views.edit": ["component_attribution_html", "edit_sweep_html"],
    "views.redundancy": ["redundancy_html"],
    "views.causal": ["reuse_html"],
    "causal.experts": ["expert_routing", "ExpertRouting", "expert_outputs", "ExpertOutputs", "moe_layers", "expert_mlp", "shared_out"],
    "causal.expert_edits": ["ablate_expert", "force_expert"],
    "views.experts": ["routing_html", "expert_outputs_html"],
}
# reachable as `headscope.NAME` but not advertised: test references, kept for code written before the re-cut
_UNLISTED = {"naive_patching": "causal.reference"}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}
__all__ = sorted(_WHERE)
_WHERE.update(_UNLISTED)

def __getattr__(name):
    if name in _WHERE:
        val = getattr(importlib.import_module(f"headscope.{_WHERE[name]}"), name)
        globals()[name] = val
        return val
    import difflib
    near = difflib.get_close_matches(name, __all__, n=3)
    raise AttributeError(f"module 'headscope' has no attribute {name!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))

def __dir__(): return sorted(list(globals()) + __all__)
