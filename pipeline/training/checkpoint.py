"""Resumable checkpoints: an interrupted run continues from its last evaluation, not from step 0.

At every evaluation the Trainer writes its own checkpoint into
`train.output_dir/checkpoints/<run id>/checkpoint-<step>/`: the adapter, the optimizer and
scheduler state, the RNG states (python, numpy, torch, CUDA) and the trainer state (global step,
log history). `Trainer.train(resume_from_checkpoint=...)` restores all of it and skips the batches
already seen, so the data order goes on where it stopped. We add a manifest, written last and
atomically: the sha256 of every file, what the checkpoint belongs to (config, data and eval
fingerprints, package versions) and the state of our callbacks and of the trainer's loss
accounting (evaluations so far, plateau counter, best weights, the running train-loss sums).

A checkpoint without a manifest was cut short by a kill and is skipped; one whose files do not
match their hashes, or that belongs to another configuration, is refused with one warning line.
Only the latest checkpoint is kept (the previous one is deleted once the new one is sealed); the
folder goes when the run has ended (`resume.discard_checkpoints`), unless
`train.keep_checkpoints`: a kill until then, even after the last step, continues from it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import Trainer, TrainerCallback

from pipeline import __version__
from pipeline.core import names
from pipeline.core.errors import one_line
from pipeline.core.files import sha256, write_atomic
from pipeline.core.provenance import package_versions
from pipeline.training.callbacks import EvalResult

log = logging.getLogger("pipeline")

MANIFEST = "pipeline_checkpoint.json"
BEST_WEIGHTS = "best_adapter.pt"  # KeepBest's weights (restore_best), beside the Trainer's files
PREFIX = "checkpoint-"  # the Trainer's folder name, + the global step
FORMAT = 1
# What must match for a checkpoint to be continued: the packages that compute a step.
VERSIONED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Identity:
    """What a checkpoint belongs to: a checkpoint of anything else is not continued."""

    config: str  # config_fingerprint of the run's config
    data: str  # the training data's fingerprint
    eval: str  # the eval set's fingerprint
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config_fingerprint: str, data_fingerprint: str, eval_fingerprint: str) -> Identity:
        installed = package_versions()
        versions = {"pipeline": __version__, **{k: installed[k] for k in VERSIONED if k in installed}}
        return cls(config_fingerprint, data_fingerprint, eval_fingerprint, versions)

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """What differs from a saved identity, one phrase each ([] when it is this one)."""
        out = [
            f"{label} fingerprint {saved.get(key)!r:.14} -> {getattr(self, key)!r:.14}"
            for key, label in (("config", "config"), ("data", "data"), ("eval", "eval data"))
            if saved.get(key) != getattr(self, key)
        ]
        old = saved.get("versions", {})
        out += [
            f"{k} {old.get(k)} -> {self.versions.get(k)}"
            for k in sorted(old.keys() | self.versions.keys())
            if old.get(k) != self.versions.get(k)
        ]
        return out


@dataclass
class Checkpoint:
    """A sealed checkpoint: where it is, its step, and the state the manifest holds."""

    path: Path
    step: int
    state: dict[str, Any]  # "callbacks": {name: state}, "loss": the trainer's loss accounting


@dataclass
class Plan:
    """A run's checkpoints: where they go, what they must match, the one it continues from, and
    where a sealed one is copied for another machine (None: nowhere)."""

    folder: Path
    identity: Identity
    resume: Checkpoint | None = None
    mirror: Callable[[Path], None] | None = None


def folder_for(output_dir: str | Path, run_id: str) -> Path:
    """Where a run's checkpoints live on this machine."""
    return Path(output_dir) / names.CHECKPOINTS_DIR / run_id


def _step(path: Path) -> int:
    m = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m else -1


def _candidates(folder: Path) -> list[Path]:
    """The checkpoint folders, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _step(p) >= 0), key=_step, reverse=True)


def latest(folder: Path, identity: Identity, warn: Callable[[str], None] = log.warning) -> Checkpoint | None:
    """The newest usable checkpoint in `folder`, or None (train from step 0). Each one refused is
    one `warn` line: cut short, corrupt (falls back to the one before), or another run's."""
    found = _candidates(folder)
    for i, path in enumerate(found):
        fallback = f"continuing from {found[i + 1].name}" if i + 1 < len(found) else "training from step 0"
        manifest = path / MANIFEST
        if not manifest.is_file():
            warn(f"checkpoint {path}: incomplete (its save was cut short); {fallback}")
            continue
        try:
            data = json.loads(manifest.read_text())
            differs = identity.differences(data["identity"])
            if differs:  # every older checkpoint of the run is the same run's: none will do
                warn(f"checkpoint {path} is of another run ({'; '.join(differs)}); training from step 0")
                return None
            bad = [name for name, digest in data["files"].items() if sha256(path / name) != digest]
            if bad:
                warn(
                    f"checkpoint {path}: corrupt ({', '.join(sorted(bad))} changed since it was saved); {fallback}"
                )
                continue
            return Checkpoint(path, int(data["step"]), data["state"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            warn(f"checkpoint {path}: unreadable ({one_line(e, 120)}); {fallback}")
    return None


class Checkpointer(TrainerCallback):
    """Asks the Trainer for a checkpoint at every evaluation, seals it with a manifest, keeps the
    latest only; on a resume, puts the trainer's loss accounting back.

    `plan` says where, what the checkpoint belongs to, the one this run continues from and where
    a sealed one is copied; `parts` are the callbacks whose state goes into the manifest (by
    name); `best_weights` gives KeepBest's kept tensors (saved beside the Trainer's files)."""

    def __init__(
        self,
        plan: Plan,
        parts: Mapping[str, Stateful],
        best_weights: Callable[[], dict[str, torch.Tensor] | None] = lambda: None,
    ) -> None:
        self.plan = plan
        self.parts = parts
        self.best_weights = best_weights
        self.trainer: Trainer | None = None  # bound by `train._trainer`
        self.saved: list[int] = []  # steps sealed in this process
        self.save_seconds = 0.0

    # --- when to save, and the resume's loss accounting ------------------------------------

    def on_evaluation(self, result: EvalResult, model: Any, control: Any) -> None:
        # Not at step 0 (nothing trained yet), not after training, not when this evaluation ends
        # the run anyway (early stopped, plateau, diverged).
        if not result.final and result.step > 0 and not control.should_training_stop:
            control.should_save = True

    def on_train_begin(self, args, state, control, **kwargs):
        if self.plan.resume is not None and self.trainer is not None:
            restore_loss_accounting(self.trainer, self.plan.resume.state.get("loss", {}))

    # --- the save ------------------------------------------------------------------------

    def save(self, write: Callable[[], None], step: int) -> None:
        """Run the Trainer's own save (`write`), then seal it. A failed save (a full disk, a lost
        mount) is one warning line and no checkpoint: the run goes on."""
        t0 = time.perf_counter()
        path = self.plan.folder / f"{PREFIX}{step}"
        try:
            if path.exists():  # an unsealed leftover of a killed process at the same step
                shutil.rmtree(path)
            write()
            self._seal(path, step)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            log.warning(f"checkpoint at step {step} not saved ({one_line(e, 160)}); training goes on")
            return
        finally:
            self.save_seconds += time.perf_counter() - t0
        self.saved.append(step)
        for old in _candidates(self.plan.folder):  # the new one is whole: the older ones can go
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        if self.plan.mirror is not None:
            try:
                self.plan.mirror(path)
            except Exception as e:  # the local copy stands; a lost worker restarts from step 0
                log.warning(f"checkpoint at step {step} not copied to the tracking store: {one_line(e, 160)}")

    def _seal(self, path: Path, step: int) -> None:
        weights = self.best_weights()
        if weights:
            torch.save(weights, path / BEST_WEIGHTS)
        state = {
            "callbacks": {name: part.state_dict() for name, part in self.parts.items()},
            "loss": loss_accounting(self.trainer) if self.trainer is not None else {},
        }
        files = {
            str(p.relative_to(path)): sha256(p)
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        manifest = {
            "format": FORMAT,
            "step": step,
            "identity": asdict(self.plan.identity),
            "files": files,
            "state": state,
        }
        write_atomic(path / MANIFEST, json.dumps(manifest, indent=1, default=float))


def restore(checkpoint: Checkpoint, parts: Mapping[str, Stateful]) -> None:
    """Our callbacks' state as it was when the checkpoint was sealed."""
    saved = checkpoint.state.get("callbacks", {})
    for name, part in parts.items():
        if name in saved:
            part.load_state_dict(saved[name])


def best_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor] | None:
    """KeepBest's weights at the checkpoint (restore_best), if it kept any."""
    path = checkpoint.path / BEST_WEIGHTS
    return torch.load(path, weights_only=True) if path.is_file() else None


# The Trainer keeps its running train-loss sums in private attributes that `train()` resets: a
# resumed run puts them back so its logged windows and its mean train loss are those of the run
# that was not interrupted (checked against transformers 5.x; absent attributes are left alone).
_LOSS_FIELDS = ("_total_loss_scalar", "_globalstep_last_logged")


def loss_accounting(trainer: Trainer) -> dict[str, float]:
    out = {k: getattr(trainer, k) for k in _LOSS_FIELDS if hasattr(trainer, k)}
    if isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
        out["_tr_loss"] = float(trainer._tr_loss.item())
    return out


def restore_loss_accounting(trainer: Trainer, saved: Mapping[str, float]) -> None:
    for k in _LOSS_FIELDS:
        if k in saved and hasattr(trainer, k):
            setattr(trainer, k, type(getattr(trainer, k))(saved[k]))
    if "_tr_loss" in saved and isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
        trainer._tr_loss.fill_(saved["_tr_loss"])
    if hasattr(trainer, "_initial_global_step"):
        trainer._initial_global_step = 0  # its mean train loss counts every step, not this call's


class ResumableTrainer(Trainer):
    """The Trainer whose checkpoint saves go through a `Checkpointer` (sealed, latest only, and a
    failed save is not a failed run)."""

    checkpointer: Checkpointer | None = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.checkpointer is None:
            super()._save_checkpoint(model, trial)
            return
        self.checkpointer.save(
            lambda: super(ResumableTrainer, self)._save_checkpoint(model, trial), self.state.global_step
        )
