"""Every metric, tag, param prefix and artifact name the pipeline writes, in one place.

Users, docs, the search and the registry rely on these names: change them only with care.
"""

# --- metrics (per training/eval step unless noted) ---
TRAIN_LOSS = "train_loss"
TRAIN_LOSS_MEAN = "train_loss_mean"  # mean over the whole run, logged at the end
EVAL_LOSS = "eval_loss"  # the default objective
EVAL_PERPLEXITY = "eval_perplexity"
LEARNING_RATE = "learning_rate"
GRAD_NORM = "grad_norm"
TOKENS_PER_SECOND = "tokens_per_second"  # non-padding training tokens per wall-clock second
PEAK_RSS_GB = "peak_rss_gb"  # peak resident memory of the process, sampled every step
PEAK_GPU_MEM_GB = "peak_gpu_mem_gb"  # torch.cuda.max_memory_allocated, CUDA only
PEAK_GPU_RESERVED_GB = "peak_gpu_reserved_gb"  # torch.cuda.max_memory_reserved, CUDA only
EPOCH = "epoch"
# logged once, at the end of a trial
TRAIN_RUNTIME_S = "train_runtime_s"
TRAIN_TOKENS = "train_tokens"
TRAIN_TOKENS_PER_SECOND = "train_tokens_per_second"  # whole-run average of tokens_per_second
TRAIN_STEPS = "train_steps"
TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"
TRAINABLE_PCT = "trainable_pct"
DATA_TRAIN_EXAMPLES = "data_train_examples"
DATA_EVAL_EXAMPLES = "data_eval_examples"
DATA_TRUNCATED = "data_truncated_examples"
DATA_DROPPED = "data_dropped_examples"
MODEL_LOAD_S = "model_load_s"
GENERATION_METRIC_PREFIX = "eval_"  # + metric key, e.g. eval_rougeL

# --- tags ---
ROLE = "pipeline.role"  # baseline | search | trial | retrain
ROLE_BASELINE = "baseline"
ROLE_SEARCH = "search"
ROLE_TRIAL = "trial"
ROLE_RETRAIN = "retrain"
BASE_MODEL = "pipeline.base_model"
DATA_FINGERPRINT = "pipeline.data_fingerprint"
EVAL_FINGERPRINT = "pipeline.eval_fingerprint"  # sha256 of the tokenized eval set
CONFIG_FINGERPRINT = "pipeline.config_fingerprint"  # what determines the result (not tracking)
GIT_COMMIT = "pipeline.git_commit"
PACKAGE_VERSIONS = "pipeline.versions"
DEVICE = "pipeline.device"
PRECISION = "pipeline.precision"
ERROR = "pipeline.error"  # one line, set on a FAILED run
PIPELINE_VERSION = "pipeline.version"

# --- artifacts ---
ADAPTER_DIR = "adapter"  # adapter_model.safetensors, adapter_config.json, tokenizer files
CONFIG_FILE = "config.yaml"  # the resolved config of the run
DATA_STATS_FILE = "data_stats.json"
GENERATIONS_FILE = "eval_generations.json"
