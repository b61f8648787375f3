"Every name that `from headscope import ...` gave before the re-cut into subpackages (2026-12) still imports"
import importlib
import pytest
import headscope

# the full flat surface as it stood before the re-cut; never shrink this list
BEFORE_RECUT = """
Ablation ActivationCache ActivationStore Activations AttentionExplorer AttributionResult
BatchTopKSAE CircuitEval CircuitGraph DATASETS DirectLogitAttribution DirectionAblation
DiskActivations EdgeScores FACTS FaithfulnessCurve FeatureActivations FeatureBrowser
GACT HEAD_KINDS HeadCensus HeadHeatmap HookContext JumpReLUSAE
KINDS LabelledPrompts LogitEffects MODES PatchingHeatmap PatchingResult
PathPatchingResult ProbeResult PromptPairs ReLUSAE SAE SAEConfig
SAEMetrics SAETrainLog SAE_ARCHS SUPPORTED_ARCHS SteeringPlayground SteeringSweep
SteeringVector TINY_ARCHS TopKSAE Transcoder TranscoderConfig VIAS
ablate ablate_attn ablate_direction ablate_heads ablate_mlps ablation_scores
act_name activation_patching add agreement agreement_scatter_html answer_loss
answer_prob arch_spec attention_explorer_html attention_stats attn_only_model attribution_patching
byte_tokenizer cache_activations circuit_eval circuit_graph_html collect_activations component
copy_losses decoder_direction diff_in_means direct_logit_attribution edge_attribution_patching embedded_gguf_path
estimate_cache evaluate_sae fact_pairs faithfulness_curve feature_card_html feature_effect
feature_hook frozen_params gact_fit geometric_median head_attribution head_census
head_dla head_heatmap_html head_views headscope_cache_dir hooks init_b_dec
ioi_pairs kl_div labelled_prompts latest_checkpoint load_model load_sae
logit_diff logit_effects logit_lens make_sae model_dims model_hook_names
model_summary naive_patching needle_tasks normalise paired_activations patch
patching_heatmap_html path_patching pattern_scores pca_direction python_docs_corpus random_symbols
rank_heads register_sae repeated_symbols repeated_tokens report_html resample_dead
resolve_names retrieval_scores run_with_cache run_with_hooks save_sae scale
scale_heads single_token_names splice splice_hooks stdlib_corpus steer
steer_eval steer_generate steered_generation_html steering_hooks steering_sweep steering_vector
text_corpus text_tokens tiny_model to_inputs token_windows top_activations
top_predictions train_induction train_probes train_sae transcoder_hooks write_report
""".split()

@pytest.mark.parametrize("name", BEFORE_RECUT)
def test_name_from_before_the_recut_imports(name):
    ns = {}
    exec(f"from headscope import {name}", ns)
    assert ns[name] is getattr(headscope, name)

def test_before_recut_list_is_complete():
    assert len(BEFORE_RECUT) == 156 and len(set(BEFORE_RECUT)) == len(BEFORE_RECUT)

def test_naive_patching_is_a_reference_not_advertised():
    assert "naive_patching" not in headscope.__all__ and callable(headscope.naive_patching)
