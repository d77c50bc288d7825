"""The typed config: YAML in, validated once, every problem reported together with its key path.

A config has the sections ``model``, ``data``, ``lora``, ``train``, ``eval``, ``tracking``,
``registry``, ``retrain`` and optionally ``search``. Unknown keys are errors. Overrides use dotted
key paths, ``train.learning_rate=1e-4``, with values parsed as YAML scalars.

- ``sections.py``: the sections of a trial; ``search.py``: the search section;
- ``schema.py``: the whole config and its cross-section checks;
- ``load.py``: YAML, overrides, validation, views (dict, YAML, params, fingerprints);
- ``reference.py``: docs/configuration.md, generated from the fields' descriptions.
"""

from pipeline.config.keys import config_field, value_kind
from pipeline.config.load import (
    ADDED_AT_DEFAULT,
    NO_RESULT_KEYS,
    apply_overrides,
    config_fingerprint,
    fingerprint,
    flatten,
    load_config,
    noise_key,
    parse_overrides,
    select_overrides,
    to_dict,
    to_yaml,
    trial_config,
    validate,
    values_at,
    with_overrides,
)
from pipeline.config.reference import reference_markdown
from pipeline.config.schema import RESULT_SECTIONS, PipelineConfig
from pipeline.config.search import (
    EarlyStoppingSpec,
    ObjectiveSpec,
    OutcomeConstraint,
    ParameterSpec,
    SearchConfig,
)
from pipeline.config.sections import (
    DataConfig,
    EvalConfig,
    LmEvalConfig,
    LoraConfig,
    ModelConfig,
    RegistryConfig,
    RetrainConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "ADDED_AT_DEFAULT",
    "NO_RESULT_KEYS",
    "RESULT_SECTIONS",
    "DataConfig",
    "EarlyStoppingSpec",
    "EvalConfig",
    "LmEvalConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveSpec",
    "OutcomeConstraint",
    "ParameterSpec",
    "PipelineConfig",
    "RegistryConfig",
    "RetrainConfig",
    "SearchConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_field",
    "config_fingerprint",
    "fingerprint",
    "flatten",
    "load_config",
    "noise_key",
    "parse_overrides",
    "reference_markdown",
    "select_overrides",
    "to_dict",
    "to_yaml",
    "trial_config",
    "validate",
    "value_kind",
    "values_at",
    "with_overrides",
]
