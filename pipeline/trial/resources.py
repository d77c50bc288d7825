"""What consecutive trials share, and what decides a trial's numbers besides its config.

`Resources` keeps the tokenizer, the prepared data and the loaded base model of one process, so a
search loads its (possibly 4-bit) base once and only the LoRA adapter changes between trials.
`identity` is what a run's tags record of its measurement (data, eval set, device, precision,
numerics versions): a baseline is reused only under the same one.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from pipeline.config import PipelineConfig, config_fingerprint, fingerprint
from pipeline.core import names
from pipeline.core.provenance import package_versions
from pipeline.data.prepare import PreparedData, prepare_data
from pipeline.model.device import DevicePlan, plan_device
from pipeline.model.load import BaseModel, free_memory, load_base_model, load_tokenizer


class Resources:
    """What consecutive trials can share: tokenizer, prepared data and the loaded base models.

    The search keeps one of these for all its trials, so each (possibly 4-bit) base is loaded
    once and only the LoRA adapter changes between trials. A search over `model.load_in_4bit`
    (or another base setting) needs one base per distinct setting: up to `max_bases` stay loaded
    (default: 2 on CPU, 1 on a GPU), the least recently used goes first.
    """

    def __init__(self, max_bases: int | None = None) -> None:
        self._tokenizers: dict[str, Any] = {}
        self._data: dict[str, PreparedData] = {}
        self._bases: OrderedDict[str, BaseModel] = OrderedDict()  # least recently used first
        self.max_bases = max_bases
        self.base_loads = 0  # how often a base model was loaded (a parallel worker tags it)

    def tokenizer(self, config: PipelineConfig) -> Any:
        key = fingerprint(config.model.model_dump())
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(config.model)
        return self._tokenizers[key]

    def data(self, config: PipelineConfig) -> PreparedData:
        key = fingerprint([config.model.model_dump(), config.data.model_dump()])
        if key not in self._data:
            self._data[key] = prepare_data(config.data, self.tokenizer(config))
        return self._data[key]

    def base_model(self, config: PipelineConfig, plan: DevicePlan) -> tuple[BaseModel, bool]:
        """The base model and whether it was reused from an earlier trial."""
        key = fingerprint([config.model.model_dump(), plan.dtype, config.train.gradient_checkpointing])
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key], True
        # On a GPU one base at a time: another kept there would count in every trial's
        # peak_gpu_mem_gb (what the search learns memory from) and take its room.
        limit = self.max_bases or (1 if plan.device == "cuda" else 2)
        while len(self._bases) >= limit:  # free the oldest before loading another
            self._bases.popitem(last=False)
            free_memory()
        base = load_base_model(config.model, plan, config.train.gradient_checkpointing)
        self._bases[key], self.base_loads = base, self.base_loads + 1
        return base, False


# Packages whose versions change a trial's numbers: a baseline is reused only under the same ones.
NUMERICS_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def identity(config: PipelineConfig, resources: Resources) -> dict[str, str]:
    """What decides a trial's numbers besides its config, as the run tags record it: data and
    eval fingerprints, device, precision, and the versions of the numerics packages. Loads the
    tokenizer and data (kept in `resources`), not the model."""
    plan = plan_device(config.model, config.train)
    data = resources.data(config)
    versions = package_versions()
    return {
        names.CONFIG_FINGERPRINT: config_fingerprint(config),
        names.DATA_FINGERPRINT: data.fingerprint,
        names.EVAL_FINGERPRINT: data.eval_fingerprint,
        names.DEVICE: plan.name,
        names.PRECISION: plan.precision,
        names.PACKAGE_VERSIONS: json.dumps({p: versions.get(p) for p in NUMERICS_PACKAGES}, sort_keys=True),
    }
