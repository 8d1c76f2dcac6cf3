"""latent_thoughts: pretrain Hugging Face causal LMs that think in continuous space before each token."""
__version__ = "0.1.0"

# The public API (the modules themselves are generated from nbs/ by nbdev_export).
from .core import (MethodLM, MethodOutput, VanillaLM, build_lm, hf_config, preset_shape, PRESETS, register_method,
                   load_method_lm, checkpoint_kind, checkpoint_class, init_weights, resolve_embed_scale, Taxonomy, taxonomy_table)
from .attention import BACKENDS, check_backend, set_attention_backend
from .data import data_dir, prepare_corpus, get_tokenizer, train_tokenizer, iter_documents, get_blocks, PackedBlocks, BlockLoader, eval_batches, prepare, EOT, doc_stream, TokenStream, StreamLoader
from .latent import LatentThoughtLM, jacobi_trace, sequential_hidden, JacobiNotConverged, THOUGHT_INITS
from .adaptive import AdaptiveLatentLM, Router, parallel_mask, halt_step, target_prob_gain, latent_step_stats, compute_vs_threshold
from .baselines import PauseLM, LoopedLM, PonderingLM, double_params_model
from .mor import MoRLM
from .evaluation import perplexity, score_windows, rolling_windows, load_documents
from .flops import flops_per_token, train_flops_per_token, model_counts, LEDGER
from .trainer import Trainer, train, evaluate as evaluate_blocks
from .config import Config, ModelConfig, DataConfig, TrainConfig, load_config, build_model
from .suite import Suite
