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
PEAK_GPU_N_MEM_GB = "peak_gpu{}_mem_gb"  # per device, when several are visible
PEAK_GPU_N_RESERVED_GB = "peak_gpu{}_reserved_gb"
# An out-of-memory trial: the memory it asked for (held + requested, at least the device's
# capacity). The search gives it to Ax as the trial's memory peaks: a measured infeasible point.
OOM_MEMORY_GB = "oom_memory_gb"
MEMORY_METRICS = (PEAK_GPU_MEM_GB, PEAK_GPU_RESERVED_GB, PEAK_RSS_GB)  # what an OOM trial reports
EPOCH = "epoch"
# logged once, at the end of a trial
TRAIN_RUNTIME_S = "train_runtime_s"
TRAIN_TOKENS = "train_tokens"
TRAIN_TOKENS_PER_SECOND = "train_tokens_per_second"  # whole-run average of tokens_per_second
TRAIN_STEPS = "train_steps"
TRAIN_MAX_STEPS = "train_max_steps"  # the steps planned (train_steps < this when stopped early)
TRAIN_EXAMPLES_PER_STEP = "train_examples_per_step"  # progression unit: step x this = examples seen
TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"
TRAINABLE_PCT = "trainable_pct"
DATA_TRAIN_EXAMPLES = "data_train_examples"
DATA_EVAL_EXAMPLES = "data_eval_examples"
DATA_TRUNCATED = "data_truncated_examples"
DATA_DROPPED = "data_dropped_examples"
MODEL_LOAD_S = "model_load_s"
CHECKPOINTS_SAVED = "train_checkpoints"  # resumable checkpoints sealed (by the last process)
CHECKPOINT_SAVE_S = "train_checkpoint_s"  # seconds those saves took (part of the training time)
BEST_EVAL_STEP = "best_eval_step"  # step of the best evaluation (the weights kept with restore_best)
GENERATION_METRIC_PREFIX = "eval_"  # + metric key, e.g. eval_rougeL
LMEVAL_PREFIX = "lmeval_"  # + task + metric (+ filter), e.g. lmeval_pydoc_mc_acc (lm-eval harness)
EVAL_ROUGE_L = "eval_rougeL"  # the default generation metric's score

# --- tags ---
# Experiment tag read by the MLflow 3 UI to choose its layout (runs table, not GenAI traces).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"

ROLE = "pipeline.role"  # baseline | search | trial | retrain
ROLE_BASELINE = "baseline"
ROLE_SEARCH = "search"
ROLE_TRIAL = "trial"
ROLE_RETRAIN = "retrain"
BASE_MODEL = "pipeline.base_model"
DATA_FINGERPRINT = "pipeline.data_fingerprint"
EVAL_FINGERPRINT = "pipeline.eval_fingerprint"  # sha256 of the tokenized eval set
CONFIG_FINGERPRINT = "pipeline.config_fingerprint"  # what determines the result (not tracking)
NOISE_KEY = (
    "pipeline.noise_key"  # model, data, eval set and training length: whose seed noise a race remembers
)
RACE_NOISE = (
    "pipeline.race_noise"  # a finished race's measured noise: {"sd_pct", "df"} (JSON), on its search run
)
GIT_COMMIT = "pipeline.git_commit"
PACKAGE_VERSIONS = "pipeline.versions"
DEVICE = "pipeline.device"  # where the trial ran, e.g. "NVIDIA H100 80GB HBM3 (1 of 8 visible)"
GPU_TAG = "pipeline.gpu{}"  # every visible GPU: "<name>, <total memory> GB"
PRECISION = "pipeline.precision"
# What ran where the device could not honour the config as written (the params keep the config):
OPTIMIZER_EFFECTIVE = "train.optimizer_effective"  # e.g. adamw_8bit for paged_adamw_8bit on CPU
QUANTIZATION_EFFECTIVE = "model.quantization_effective"  # e.g. "nf4, double quant; compute float32; ..."
FALLBACKS = "pipeline.fallbacks"  # one line per setting that ran differently, "; "-separated
ERROR = "pipeline.error"  # one line, set on a FAILED run
PIPELINE_VERSION = "pipeline.version"
# MLflow's own tags that the pipeline sets or reads.
NOTE = "mlflow.note.content"  # the run's description in the UI (markdown)
PARENT_RUN_ID = "mlflow.parentRunId"

# --- artifacts ---
ADAPTER_DIR = "adapter"  # adapter_model.safetensors, adapter_config.json, tokenizer files
BASE_REFERENCE_FILE = "pipeline_base.json"  # inside adapter/: how to rebuild the base model
CONFIG_FILE = "config.yaml"  # the resolved config of the run
ERROR_FILE = "error.txt"  # on a failed run: the full traceback of what failed
DATA_STATS_FILE = "data_stats.json"
GENERATIONS_FILE = "eval_generations.json"
# Per-example eval losses of the run's final evaluation (stats.ExampleScores): what paired
# comparisons (confidence intervals, promotion) read.
EVAL_EXAMPLES_FILE = "eval_examples.json"
LMEVAL_RESULTS_FILE = "lm_eval/results.json"  # the harness's results table of the trial
LMEVAL_CONFIGS_FILE = "lm_eval/task_configs.json"  # the tasks as the harness resolved them
LMEVAL_EXAMPLES_FILE = "lm_eval/examples/{}.json"  # a task metric's per-document scores (stats.ExampleScores)

# Metrics a finished trial always reports (plus eval_<key> of its generation metric), so the
# ones a search may optimize or constrain.
TRIAL_METRICS = frozenset(
    {
        EVAL_LOSS,
        EVAL_PERPLEXITY,
        TRAIN_LOSS_MEAN,
        PEAK_RSS_GB,
        PEAK_GPU_MEM_GB,
        PEAK_GPU_RESERVED_GB,
        TRAIN_TOKENS_PER_SECOND,
        TRAIN_RUNTIME_S,
        TRAINABLE_PARAMS,
        TRAINABLE_PCT,
    }
)


# What the shipped generation metrics log (eval_<key>); a hub metric's keys are known only once run.
GENERATION_METRIC_KEYS = {"rouge_l": ("rougeL",), "exact_match": ("exact_match",)}
CUDA_ONLY_METRIC_PREFIX = "peak_gpu"  # peak_gpu_mem_gb, peak_gpu_reserved_gb, peak_gpu<i>_...: CUDA only


def is_trial_metric(name: str) -> bool:
    """True for metrics a finished trial logs (generation metrics are `eval_<key>`, task metrics
    `lmeval_<task>_<metric>`)."""
    return name in TRIAL_METRICS or name.startswith((GENERATION_METRIC_PREFIX, LMEVAL_PREFIX))


# --- trial statuses: values of the `trial.status` tag, and of the search's trial records ---
COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"  # stopped by the search's early-stopping rule; a partial result
FAILED = "failed"  # an error or a NaN loss; Ax may propose the region again
ABANDONED = "abandoned"  # out of memory: the same config would fail again, Ax will not retry it
KILLED = "killed"  # interrupted (Ctrl-C, SIGTERM, a crash): a resumed search continues or reruns it
RUNNING = "running"
FINISHED_STATUSES = (COMPLETED, EARLY_STOPPED, FAILED, ABANDONED)
SCORED_STATUSES = (COMPLETED, EARLY_STOPPED)

# --- search: tags and metrics of the parent run and its trials ---
AX_TRIAL_INDEX = "ax.trial_index"
AX_GENERATION_METHOD = "ax.generation_method"  # Sobol | BoTorch | CenterOfSearchSpace | Manual
TRIAL_STATUS = "trial.status"  # one of the statuses above; every run of run_trial tags its own
TRIAL_FAILURE_REASON = "trial.failure_reason"
# A run continued from its last checkpoint (after a kill, a lost worker): the step it continued
# from, and how many times it was continued.
TRIAL_RESUMED_FROM_STEP = "trial.resumed_from_step"
TRIAL_RESUMES = "trial.resumes"
# A trial run again after it ran out of memory, with half the micro-batch (train.oom_retry): how.
TRIAL_OOM_RETRY = "trial.oom_retry"
TRIAL_PACK = "trial.pack"  # search.pack > 1: which pack the trial trained in (1, 2, ... per search session)
TRIAL_PACK_SLOT = "trial.pack_slot"  # and its place in it (0 .. pack-1)
# Parallel searches (search.executor: ray): which worker ran a trial. A worker loads the base model
# once; `trial.worker_base_loads` counts its loads so far (1 on every run of a healthy worker).
TRIAL_WORKER = "trial.worker"  # w1, w2, ... (a replaced worker keeps its slot's id)
TRIAL_WORKER_PID = "trial.worker_pid"
TRIAL_WORKER_HOST = "trial.worker_host"
TRIAL_WORKER_BASE_LOADS = "trial.worker_base_loads"
# Seed replicates (search.replicates): which configuration a run replicates (an Ax trial index,
# or "baseline") and its train.seed. Not trials: no Ax index, not counted in n_trials.
TRIAL_REPLICATE_OF = "trial.replicate_of"
TRIAL_REPLICATE_SEED = "trial.replicate_seed"
SEARCH_BASELINE_RUN = "search.baseline_run_id"
SEARCH_BEST_RUN = "search.best_run_id"
SEARCH_WARM_START = "search.warm_start_runs"  # comma-separated search run ids
SEARCH_SOURCE_RUN = "search.source_run_id"  # on a retrain run: the search it retrains
RETRAIN_SOURCE = "retrain.source"  # champion <name> vN (search run ...) | search run ... | file ...
SEARCH_RESUMED_INTO = "search.resumed_into"  # on a run created by `mlflow run` that resumed another
BASELINE_EVAL_LOSS = "baseline_eval_loss"
BEST_EVAL_LOSS = "best_eval_loss"  # also a step series over trials: the optimization trace
TRIAL_EVAL_LOSS = "trial_eval_loss"  # step series over trials
IMPROVEMENT_PCT = "improvement_pct"  # the recommendation on the baseline (replicate means where run)
IMPROVEMENT_CI_LOW = "improvement_ci_low_pct"  # its confidence interval (registry.confidence)
IMPROVEMENT_CI_HIGH = "improvement_ci_high_pct"
IMPROVEMENT_SINGLE_RUN_PCT = "improvement_single_run_pct"  # the selection run vs the baseline run
REPLICATE_RUNS = "replicate_runs"  # seed replicates that completed
TRIALS_COMPLETED = "trials_completed"
TRIALS_EARLY_STOPPED = "trials_early_stopped"
TRIALS_FAILED = "trials_failed"
TRIALS_ABANDONED = "trials_abandoned"
SEARCH_WALL_S = "search_wall_s"
STEPS_SAVED_PCT = "early_stopping_steps_saved_pct"

# --- search artifacts (on the parent run) ---
REPORT_DIR = "report"  # search_report.md + PNG plots
REPORT_FILE = "search_report.md"
REPORT_PLOTS = {
    "trace": "optimization_trace.png",
    "curves": "eval_loss_curves.png",
    "slices": "parameter_slices.png",
    "pareto": "pareto_front.png",
}
RETRAIN_REPORT_FILE = "retrain_report.md"  # in report/ of a retrain run
RETRAIN_PLOT_FILE = "retrain_eval_loss.png"
BEST_CONFIG_FILE = "best_config.yaml"
STATE_DIR = "search_state"  # ax_state.json + trials.json, updated after every trial
AX_STATE_FILE = "ax_state.json"
TRIALS_FILE = "trials.json"

# --- local folders (under train.output_dir) ---
ADAPTERS_DIR = "adapters"  # adapters/<run id>/adapter/: the local copy of a run's adapter/ artifact
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/<run id>/checkpoint-<step>/: a running run's latest
# A run's latest checkpoint as an artifact (a Ray worker's, whose disk may not outlive it).
CHECKPOINT_ARTIFACT = "checkpoint"

# --- registry ---
CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"
MODEL_ARTIFACT = "model"  # the pyfunc model logged for registration
# Tags of a registered model version.
VERSION_SOURCE_RUN = "source_run_id"  # the run whose adapter this version holds
VERSION_EVAL_LOSS = "eval_loss"
VERSION_EVAL_FINGERPRINT = "eval_fingerprint"  # versions compare only on the same eval data
VERSION_ADAPTER_SHA = "adapter_sha256"
VERSION_BASE_MODEL = "base_model"
VERSION_SEARCH_RUN = "search_run_id"  # the search behind it (retrain retrains that search's best)
VERSION_IMPROVEMENT_PCT = IMPROVEMENT_PCT  # the search run's metric names serve as version tags too
VERSION_DATA_FINGERPRINT = "data_fingerprint"
VERSION_RETRAIN_SOURCE = "retrain_source"
VERSION_OBJECTIVE = "objective"  # the metric the version was chosen on (the search's first objective)
VERSION_OBJECTIVE_VALUE = "objective_value"
VERSION_OBJECTIVE_FINGERPRINT = "objective_fingerprint"  # scores compare only under the same one
VERSION_OBJECTIVE_STDERR = "objective_stderr"  # a task score's harness stderr
VERSION_SCORED_RUNS = "scored_runs"  # seed:run_id,...: the runs its score rests on (replicates)
VERSION_PROMOTION_RULE = "promotion_rule"  # the rule the champion alias was decided by
VERSION_VS_CHAMPION = "improvement_vs_champion"  # the interval it was judged on, vs which version
VERSION_IMPROVEMENT_CI = "improvement_ci"  # vs the baseline: "low to high %" at registry.confidence
