"""Checkpoints at every evaluation, and a run continued from one: the same curve and weights as
a run never interrupted; refusals and faults (cut short, corrupt, another config, a full disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.config import with_overrides
from pipeline.core import interrupt, names
from pipeline.core.errors import TrialInterrupted
from pipeline.training import checkpoint
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec, run_trial


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


def _stop_after(step: int):
    """An on_eval hook that asks for a stop at the evaluation of `step` (the run then ends KILLED
    after the next optimizer step, its checkpoint at `step` sealed)."""

    def hook(event) -> bool:
        if event.step == step:
            interrupt.request_stop()
        return False

    return hook


def _interrupted(config, resources, at: int, spec: RunSpec | None = None) -> str:
    with pytest.raises(TrialInterrupted) as e:
        run_trial(config, spec, resources=resources, on_eval=_stop_after(at), quiet=True)
    interrupt._STOP.clear()
    return e.value.run_id


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline" and r.levelname == "WARNING"]


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


@pytest.fixture
def config(tiny_config):
    """12 steps, an evaluation every 3, dropout on: RNG, data order and the plateau rule matter."""
    return with_overrides(
        tiny_config,
        {
            "train.eval_steps": 3,
            "train.restore_best": True,
            "train.early_stopping_patience": 3,
            "lora.dropout": 0.1,
        },
    )


def test_a_run_continued_from_its_checkpoint_ends_exactly_as_one_never_interrupted(config):
    resources = Resources()
    whole = run_trial(config, resources=resources, quiet=True)
    run_id = _interrupted(config, resources, at=6)
    folder = checkpoint.folder_for(config.train.output_dir, run_id)
    assert [p.name for p in folder.iterdir()] == ["checkpoint-6"]  # the latest only
    assert MlflowClient().get_run(run_id).data.tags[names.TRIAL_STATUS] == names.KILLED

    continued = run_trial(config, RunSpec(resume=run_id), resources=resources, quiet=True)

    assert continued.run_id == run_id  # the same run, reopened
    assert continued.evals == whole.evals and len(whole.evals) == 4
    assert continued.eval_loss == whole.eval_loss
    assert continued.metrics[names.TRAIN_LOSS_MEAN] == whole.metrics[names.TRAIN_LOSS_MEAN]
    mine, theirs = _adapter(continued), _adapter(whole)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[names.TRIAL_STATUS] == names.COMPLETED
    assert run.data.tags[names.TRIAL_RESUMED_FROM_STEP] == "6" and run.data.tags[names.TRIAL_RESUMES] == "1"
    # One point per step: what the killed process streamed is not logged again, and the curves
    # are those of the run that was not interrupted.
    for key in (names.EVAL_LOSS, names.TRAIN_LOSS):
        assert _history(run_id, key) == _history(whole.run_id, key), key
    assert not folder.exists()  # the run ended: its checkpoint goes


def test_a_run_killed_after_its_last_step_continues_from_its_last_checkpoint(config):
    """The checkpoints go only when the run has ended: a kill while the retrain registers (or the
    trial generates) continues from the last checkpoint, to the same result."""
    resources = Resources()
    whole = run_trial(config, resources=resources, quiet=True)

    def killed_while_registering(run, result):
        raise KeyboardInterrupt

    with pytest.raises(TrialInterrupted) as e:
        run_trial(config, resources=resources, on_complete=killed_while_registering, quiet=True)
    run_id = e.value.run_id
    assert [p.name for p in checkpoint.folder_for(config.train.output_dir, run_id).iterdir()] == [
        "checkpoint-9"
    ]
    continued = run_trial(config, RunSpec(resume=run_id), resources=resources, quiet=True)
    assert MlflowClient().get_run(run_id).data.tags[names.TRIAL_RESUMED_FROM_STEP] == "9"
    assert continued.evals == whole.evals and continued.eval_loss == whole.eval_loss


def test_keep_checkpoints_keeps_the_last_one_and_checkpoints_false_saves_none(config):
    kept = run_trial(with_overrides(config, {"train.keep_checkpoints": True}), quiet=True)
    folder = checkpoint.folder_for(config.train.output_dir, kept.run_id)
    assert [p.name for p in folder.iterdir()] == ["checkpoint-9"]  # not at the last step: it ended
    manifest = json.loads((folder / "checkpoint-9" / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 9 and manifest["identity"]["config"] == kept.config_fingerprint
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(
        manifest["files"]
    )
    assert [e[0] for e in manifest["state"]["callbacks"]["evaluation"]["evals"]] == [3, 6, 9]
    off = run_trial(with_overrides(config, {"train.checkpoints": False}), quiet=True)
    assert off.evals == kept.evals
    assert not checkpoint.folder_for(config.train.output_dir, off.run_id).exists()


def _sealed(config, resources, at: int = 6) -> tuple[str, Path]:
    """A killed run and the folder of its checkpoints (kept: the one at `at`, and one at 3)."""
    keep = with_overrides(config, {"train.keep_checkpoints": True})
    run_id = _interrupted(keep, resources, at)
    return run_id, checkpoint.folder_for(config.train.output_dir, run_id)


def _identity(config, resources) -> checkpoint.Identity:
    from pipeline.config import config_fingerprint

    data = resources.data(config)
    return checkpoint.Identity.of(config_fingerprint(config), data.fingerprint, data.eval_fingerprint)


def test_a_checkpoint_cut_short_or_corrupt_falls_back_with_one_warning(config, caplog):
    resources = Resources()
    _, folder = _sealed(config, resources)
    identity = _identity(config, resources)
    assert checkpoint.latest(folder, identity).step == 6
    # A save cut short at step 9 (no manifest): the checkpoint at 6 is used.
    (folder / "checkpoint-9").mkdir()
    (folder / "checkpoint-9" / "optimizer.pt").write_bytes(b"half")
    with caplog.at_level("WARNING", logger="pipeline"):
        assert checkpoint.latest(folder, identity).step == 6
    assert _warnings(caplog) == [
        f"checkpoint {folder / 'checkpoint-9'}: incomplete (its save was cut short); continuing from checkpoint-6"
    ]
    # A truncated file in the only sealed checkpoint: none is usable, step 0.
    caplog.clear()
    weights = folder / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="pipeline"):
        assert checkpoint.latest(folder, identity) is None
    lines = _warnings(caplog)
    assert len(lines) == 2 and "corrupt (adapter_model.safetensors changed" in lines[1]
    assert lines[1].endswith("training from step 0")


def test_a_checkpoint_of_another_config_is_refused_and_the_run_starts_over(config, caplog):
    resources = Resources()
    run_id, folder = _sealed(config, resources)
    other = with_overrides(config, {"train.learning_rate": 5e-4})
    with caplog.at_level("WARNING", logger="pipeline"):
        assert checkpoint.latest(folder, _identity(other, resources)) is None
    (line,) = _warnings(caplog)
    assert "is of another run (config fingerprint" in line and line.endswith("training from step 0")
    # Another package version is named too.
    saved = json.loads((folder / "checkpoint-6" / checkpoint.MANIFEST).read_text())["identity"]
    newer = checkpoint.Identity(
        saved["config"], saved["data"], saved["eval"], {**saved["versions"], "torch": "9.0"}
    )
    assert newer.differences(saved) == [f"torch {saved['versions']['torch']} -> 9.0"]
    # Continued with the other config, the run trains from step 0 (and still ends right).
    continued = run_trial(other, RunSpec(resume=run_id), resources=resources, quiet=True)
    assert MlflowClient().get_run(run_id).data.tags[names.TRIAL_RESUMED_FROM_STEP] == "0"
    assert [s for s, _ in continued.evals] == [3, 6, 9, 12]


def test_a_full_disk_fails_the_save_not_the_run(config, monkeypatch, caplog):
    """Every save raises ENOSPC: one warning per save, no checkpoint left, the run completes with
    the losses of a run that saved."""
    import errno

    from transformers import Trainer

    def full_disk(self, model, trial):
        (Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    resources = Resources()
    saved = run_trial(config, resources=resources, quiet=True)
    monkeypatch.setattr(Trainer, "_save_checkpoint", full_disk)
    with caplog.at_level("WARNING", logger="pipeline"):
        result = run_trial(
            with_overrides(config, {"train.keep_checkpoints": True}), resources=resources, quiet=True
        )
    assert result.status == names.COMPLETED and result.evals == saved.evals
    lines = [line for line in _warnings(caplog) if "not saved" in line]
    assert lines == [
        f"checkpoint at step {s} not saved ([Errno 28] No space left on device); training goes on"
        for s in (3, 6, 9)
    ]
    assert not any(checkpoint.folder_for(config.train.output_dir, result.run_id).iterdir())


def test_a_run_whose_disk_is_gone_continues_from_its_copy_in_the_tracking_store(config):
    """What a Ray worker does (its disk may not outlive it): each sealed checkpoint is copied to
    the run's artifacts; a run continued elsewhere fetches it."""
    import shutil

    resources = Resources()
    whole = run_trial(config, resources=resources, quiet=True)
    run_id = _interrupted(config, resources, at=6, spec=RunSpec(checkpoint_store=True))
    listed = {f.path for f in MlflowClient().list_artifacts(run_id, names.CHECKPOINT_ARTIFACT)}
    assert f"{names.CHECKPOINT_ARTIFACT}/{checkpoint.MANIFEST}" in listed
    shutil.rmtree(checkpoint.folder_for(config.train.output_dir, run_id))  # the worker's disk

    continued = run_trial(config, RunSpec(resume=run_id), resources=resources, quiet=True)
    assert MlflowClient().get_run(run_id).data.tags[names.TRIAL_RESUMED_FROM_STEP] == "6"
    assert continued.evals == whole.evals and continued.eval_loss == whole.eval_loss
