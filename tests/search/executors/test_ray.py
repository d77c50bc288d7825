"""Parallel trials on Ray (`search.executor: ray`): planning, refusals, and real searches.

The unit tests at the top need no cluster. The `distributed` tests start a local Ray cluster
(2 CPUs) and track to a real `mlflow server` on PostgreSQL with a proxied S3 artifact store
(tests/servers.py); one also runs `mlflow run . -e search` with 2 workers against sqlite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.core import names
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.search.executors import ray as distributed
from pipeline.training.checkpoint import MANIFEST

from ... import servers
from ...conftest import DEMO_CONFIG, ROOT, mlflow_run_command, run_cli, tiny_overrides, venv_env


def _search(tmp_path, **extra):
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **{"search.executor": "ray", **extra})).search


class _FakeRay(types.SimpleNamespace):
    """Just enough of `ray` to reach the checks made before any worker starts."""

    def __init__(self, nodes: int, cluster: dict[str, float]):
        super().__init__(shutdowns=0)
        self._nodes, self._cluster, self._up = nodes, cluster, False

    def is_initialized(self):
        return self._up

    def init(self, **kwargs):
        self._up = True

    def nodes(self):
        return [{"Alive": True}] * self._nodes + [{"Alive": False}]

    def cluster_resources(self):
        return self._cluster

    def kill(self, actor):
        pass

    def shutdown(self):
        self.shutdowns += 1
        self._up = False


def _overrides(tmp_path: Path, **extra) -> str:
    values = {
        "search.executor": "ray",
        "search.workers": 2,
        "search.output_dir": str(tmp_path / "search"),
        "search.initialization_trials": 6,
        "search.early_stopping.enabled": True,
        "search.early_stopping.min_curves": 1,
        "train.max_steps": 16,
        "train.eval_steps": 4,
        "registry.model_name": "dist-lora",
        "tracking.experiment_name": "dist",
        **extra,
    }
    text = " ".join(tiny_overrides(tmp_path, **values))
    return text + " search.parameters.train.learning_rate.bounds=[1.0e-5,1.0e-2]"


def _search_command(tmp_path: Path, n_trials: int, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "pipeline", "search", "--config", str(DEMO_CONFIG)),
        *("--n-trials", str(n_trials), "--set", _overrides(tmp_path), *extra),
    ]


def _env(tmp_path: Path, tracking_uri: str) -> dict[str, str]:
    env = venv_env(tmp_path)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster; no token file in $HOME
    for key in ("RAY_ADDRESS", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)  # the client reaches artifacts through the server only
    return env


def _runs(client: MlflowClient, experiment: str = "dist") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _parent(runs: list):
    (parent,) = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SEARCH]
    return parent


def _trials(runs: list) -> list:
    return [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_TRIAL]


def _watch(client: MlflowClient, until, experiment: str = "dist", timeout_s: float = 900):
    """Poll the experiment's runs until `until(runs)` returns something; that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = until(_runs(client, experiment))
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError("the awaited state never came")


def _check_same_curve_as_uninterrupted(client: MlflowClient, run_id: str, tmp_path: Path) -> None:
    """The continued trial's eval losses are those of its config trained here without a kill (on
    one thread, as its worker; up to where Ax stopped it, if it did)."""
    import torch

    from pipeline.trial.run import run_trial

    config_file = client.download_artifacts(run_id, names.CONFIG_FILE, str(tmp_path))
    config = load_config(config_file, [f"train.output_dir={tmp_path / 'ref'}"], search=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_trial(config, quiet=True)
    finally:
        torch.set_num_threads(threads)
    continued = [(m.step, m.value) for m in client.get_metric_history(run_id, names.EVAL_LOSS)]
    assert continued and continued == reference.evals[: len(continued)], (continued, reference.evals)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    with servers.team_server(tmp_path_factory.mktemp("team")) as server:
        yield server


def _check_team_store(team, run_id: str, tmp_path: Path) -> None:
    """The team recipe: the run is a row in PostgreSQL, its adapter objects in S3, and a client
    with no S3 settings downloads it (by default from presigned S3 URLs; with
    MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false, streamed through the server)."""
    import psycopg

    with psycopg.connect(team.postgres_dsn) as conn:
        row = conn.execute("select status from runs where run_uuid = %s", (run_id,)).fetchone()
    assert row == ("FINISHED",)
    adapter = f"{run_id}/artifacts/{names.ADAPTER_DIR}/adapter_model.safetensors"
    (key,) = [k for k in team.s3_keys() if k.endswith(adapter)]
    stored = servers.s3_client(team.s3_endpoint).get_object(Bucket=team.bucket, Key=key)["Body"].read()
    client = MlflowClient(tracking_uri=team.url)
    presigned = Path(client.download_artifacts(run_id, names.ADAPTER_DIR, str(tmp_path / "presigned")))
    assert (presigned / "adapter_model.safetensors").read_bytes() == stored
    os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] = "false"
    try:
        proxied = Path(client.download_artifacts(run_id, names.ADAPTER_DIR, str(tmp_path / "proxied")))
    finally:
        os.environ.pop("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD")
    assert (proxied / "adapter_model.safetensors").read_bytes() == stored
    root = client.get_run(run_id).info.artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
    path = f"/api/2.0/mlflow-artifacts/artifacts/{root}/{names.ADAPTER_DIR}/adapter_model.safetensors"
    assert f"GET {path} " in team.log.read_text(), "the proxied download did not go through the server"


def test_worker_plan_follows_the_cluster(tmp_path):
    plan = distributed._plan
    cpu_box = {"CPU": 16.0}
    assert plan(_search(tmp_path), cpu_box, lambda: None) == (1, 0.0, 16.0)
    assert plan(_search(tmp_path, **{"search.workers": 4}), cpu_box, lambda: None) == (4, 0.0, 4.0)
    gpu_box = {"CPU": 32.0, "GPU": 8.0}  # one worker per GPU, each pinned to its own
    assert plan(_search(tmp_path), gpu_box, lambda: None) == (8, 1.0, 4.0)
    two_per_gpu = _search(tmp_path, **{"search.workers": 16, "search.worker_resources.gpus": 0.5})
    assert plan(two_per_gpu, gpu_box, lambda: None) == (16, 0.5, 2.0)

    closed = []
    too_many = _search(tmp_path, **{"search.workers": 9})
    with pytest.raises(PipelineError) as e:
        plan(too_many, gpu_box, lambda: closed.append(True))
    assert str(e.value).startswith(
        "search.workers: 9 workers x (1 GPU, 3 CPU) need 9 GPUs (the cluster has 8)"
    )
    assert closed == [True]  # a cluster the search started is shut down again


def test_store_uris_as_workers_see_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert distributed.absolute_store_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert distributed.absolute_store_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert distributed.absolute_store_uri("mlruns") == str(tmp_path / "mlruns")
    assert distributed.absolute_store_uri("http://10.0.0.2:5000") == "http://10.0.0.2:5000"
    assert tracking.is_local_store("sqlite:///mlflow.db") and tracking.is_local_store("mlruns")
    assert not tracking.is_local_store("postgresql+psycopg://u@db/mlflow")
    assert not tracking.is_local_store("https://mlflow.example.com")


def test_the_mailbox_actor_imports_nothing_heavy():
    """The driver's mailbox starts as a Ray actor in a moment: importing it loads no torch,
    transformers, mlflow or ax (a worker imports those once, the mailbox never)."""
    code = "import sys, pipeline.search.executors.mailbox; print(sorted({'torch', 'transformers', 'mlflow', 'ax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_trial_whose_driver_is_gone_ends_killed_to_run_again(tiny_config):
    """A worker orphaned by a killed driver must not record its trial FAILED: a resumed search
    would count it as a failure instead of running its config again."""
    from pipeline.search.executors.local import TrialJob, run_job
    from pipeline.trial.resources import Resources
    from pipeline.trial.run import RunSpec

    class Gone(Exception):  # what ray.get raises once the driver's mailbox actor died with it
        pass

    def get(ref):
        raise Gone("actor died")

    ray = types.SimpleNamespace(get=get)
    reports = types.SimpleNamespace(ask=types.SimpleNamespace(remote=lambda *a: "ref"))

    def on_eval(event):
        return distributed.ask_driver(ray, reports, (0, 0), event)

    base = tiny_config.model_copy(update={"search": None})
    spec = RunSpec(names.ROLE_TRIAL, "trial-01", tags={names.AX_TRIAL_INDEX: 2})
    out = run_job(TrialJob(2, base, {"lora.r": 4}, spec), Resources(), on_eval, quiet=True)
    assert out.status == names.KILLED and out.run_id
    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "KILLED" and run.data.tags[names.TRIAL_STATUS] == names.KILLED


def test_a_multi_node_cluster_refuses_a_sqlite_store(tmp_path, monkeypatch):
    config = load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **{"search.executor": "ray"}))
    fake = _FakeRay(nodes=3, cluster={"CPU": 48.0, "GPU": 3.0})
    monkeypatch.setattr(distributed, "_ray", lambda: fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PipelineError) as e:
        distributed.RayExecutor(config, "sqlite:///mlflow.db")
    assert str(e.value).startswith(
        "tracking.tracking_uri: sqlite:///mlflow.db is a local store and the Ray cluster has 3 nodes"
    )
    assert "tracking server" in str(e.value) and fake.shutdowns == 1


def test_ray_settings_without_the_ray_executor_are_config_errors():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CONFIG, ["search.workers=4", "search.ray_address=auto"])
    assert "search: workers, ray_address apply to search.executor: ray (it is 'local')" in str(e.value)


def test_without_ray_installed_the_ray_executor_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.chdir(ROOT)
    args = ["search", "--config", str(DEMO_CONFIG), "--n-trials", "2", "--quiet", "--set"]
    args.append(" ".join(tiny_overrides(tmp_path, **{"search.executor": "ray"})))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert lines == ["error: search.executor: ray needs Ray: pip install -e '.[distributed]'"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])  # no run started


@pytest.mark.distributed
def test_parallel_search_on_ray_with_a_team_server_absorbs_a_killed_worker(tmp_path, team):
    client = MlflowClient(tracking_uri=team.url)
    proc = subprocess.Popen(
        _search_command(tmp_path, 6),
        cwd=ROOT,
        env=_env(tmp_path, team.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()

    def checkpointed_trial(runs):  # a running trial whose worker copied a checkpoint to the store
        for r in _trials(runs):
            if r.info.status == "RUNNING" and names.TRIAL_WORKER_PID in r.data.tags:
                listed = client.list_artifacts(r.info.run_id, names.CHECKPOINT_ARTIFACT)
                if any(f.path.endswith(MANIFEST) for f in listed):
                    return r
        return None

    try:
        victim = _watch(client, checkpointed_trial)
        os.kill(int(victim.data.tags[names.TRIAL_WORKER_PID]), signal.SIGKILL)
        assert proc.wait(timeout=1200) == 0, "".join(output)[-4000:]
    finally:
        proc.kill()
    reader.join(5)
    log = "".join(output)

    runs = _runs(client)
    parent = _parent(runs)
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    kids = [r for r in runs if r.info.run_id != pid]
    assert all(r.data.tags.get("mlflow.parentRunId") == pid for r in kids)  # one parent, all nested
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    trials = _trials(runs)
    assert len({r.data.tags[names.AX_TRIAL_INDEX] for r in trials}) == len(trials) == 6  # no duplicate

    # The dead worker's trial went on from its checkpoint on a new worker, in the same run.
    continued = client.get_run(victim.info.run_id)
    assert continued.info.status == "FINISHED", continued.data.tags
    assert continued.data.tags[names.TRIAL_STATUS] in names.SCORED_STATUSES
    assert int(continued.data.tags[names.TRIAL_RESUMED_FROM_STEP]) >= 4
    assert continued.data.tags[names.TRIAL_RESUMES] == "1"
    assert continued.data.tags[names.TRIAL_WORKER_PID] != victim.data.tags[names.TRIAL_WORKER_PID]
    steps = [m.step for m in client.get_metric_history(victim.info.run_id, names.EVAL_LOSS)]
    assert steps == sorted(set(steps)), steps  # each evaluation once
    assert "died mid-trial" in log and "continues from its last checkpoint on a new worker" in log
    _check_same_curve_as_uninterrupted(client, victim.info.run_id, tmp_path)
    statuses = sorted(r.data.tags[names.TRIAL_STATUS] for r in trials)
    assert names.FAILED not in statuses, statuses
    assert names.EARLY_STOPPED in statuses, statuses  # Ax stopped one through the streamed evals
    for r in trials:
        if r.data.tags[names.TRIAL_STATUS] == names.EARLY_STOPPED:
            assert r.data.metrics[names.TRAIN_STEPS] < r.data.metrics[names.TRAIN_MAX_STEPS]

    # Two workers, then a third process replacing the killed one: each loaded the base once.
    workers = {(r.data.tags[names.TRIAL_WORKER], r.data.tags[names.TRIAL_WORKER_PID]) for r in trials}
    assert {w for w, _ in workers} == {"w1", "w2"} and len(workers) <= 3, workers
    loads = {r.data.tags.get(names.TRIAL_WORKER_BASE_LOADS) for r in trials if r.info.status == "FINISHED"}
    assert loads == {"1"}, loads
    assert all(r.data.tags[names.DEVICE].startswith("cpu (1 threads)") for r in trials)

    # As in a local search: the report, best_config.yaml, the champion; artifacts in S3.
    out = tmp_path / "search" / pid
    assert (out / "best_config.yaml").is_file()
    assert "# LoRA search report" in (out / names.REPORT_DIR / names.REPORT_FILE).read_text()
    champion = client.get_model_version_by_alias("dist-lora", "champion")
    best = client.get_run(champion.tags["source_run_id"])
    assert best.data.tags["mlflow.parentRunId"] == pid and best.data.tags[names.TRIAL_STATUS] == "completed"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    _check_team_store(team, best.info.run_id, tmp_path)

    assert "ray: 2 workers x (0 GPU, 1 CPU)" in log and log.count("] trial-") == 6


@pytest.mark.distributed
def test_a_killed_driver_resumes_without_losing_a_trial(tmp_path, team):
    client = MlflowClient(tracking_uri=team.url)
    experiment = "dist-resume"
    cmd = _search_command(tmp_path, 4, "--set", f"tracking.experiment_name={experiment}")
    env = _env(tmp_path, team.url)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def one_finished_one_starting(runs):
        # A trial still before its first evaluation has evaluations left to send the driver, so
        # it cannot finish once the driver is gone. (Another in flight may be past its last one:
        # if it finishes meanwhile, the resume takes its result from its run.)
        trials = _trials(runs)
        done = [r for r in trials if r.data.tags.get(names.TRIAL_STATUS) in names.FINISHED_STATUSES]
        starting = [r for r in trials if r.info.status == "RUNNING" and names.EVAL_LOSS not in r.data.metrics]
        return (done, starting[0]) if done and starting else None

    try:
        done, starting = _watch(client, one_finished_one_starting, experiment)
        proc.send_signal(signal.SIGKILL)  # the driver dies; Ray's processes share its fate
        proc.wait(timeout=60)
    finally:
        proc.kill()
    before = {r.info.run_id: r.data.tags[names.TRIAL_STATUS] for r in done}
    parent = _parent(_runs(client, experiment))
    time.sleep(3)  # let the orphaned workers notice

    resume = [*cmd, "--resume", parent.info.run_id]
    p = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    runs = _runs(client, experiment)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    trials = _trials(runs)
    finished = [r for r in trials if r.data.tags.get(names.TRIAL_STATUS) in names.FINISHED_STATUSES]
    assert len(finished) == 4
    for run_id, status in before.items():  # nothing finished before the kill was lost or redone
        assert client.get_run(run_id).data.tags[names.TRIAL_STATUS] == status
    # Each trial in flight at the kill (its run RUNNING, or not yet started on its worker) is
    # recorded killed and its config ran again, once; a run it had left RUNNING ended KILLED.
    records = json.loads(
        (tmp_path / "search" / parent.info.run_id / names.STATE_DIR / names.TRIALS_FILE).read_text()
    )["trials"]
    killed = [t["parameters"] for t in records if t["status"] == names.KILLED]
    retried = [t["parameters"] for t in records if t["generation_method"] == "retry"]
    assert killed and sorted(map(str, killed)) == sorted(map(str, retried)), records
    assert all(t["status"] in names.FINISHED_STATUSES for t in records if t["generation_method"] == "retry")
    left_running = [r for r in trials if r.info.status == "KILLED"]
    assert len(left_running) <= len(killed)
    assert all(r.data.tags[names.TRIAL_STATUS] == names.KILLED for r in left_running)
    # The trial caught before its first evaluation: killed, never failed, and its config ran again.
    cut = client.get_run(starting.info.run_id)
    assert (cut.info.status, cut.data.tags[names.TRIAL_STATUS]) == ("KILLED", names.KILLED)
    (cut_record,) = [t for t in records if t["index"] == int(cut.data.tags[names.AX_TRIAL_INDEX])]
    assert cut_record["status"] == names.KILLED and cut_record["parameters"] in retried
    assert not [t for t in records if t["status"] == names.FAILED], records
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.distributed
def test_ctrl_c_stops_every_worker_and_ends_their_runs_killed(tmp_path):
    """Ctrl-C in a terminal signals the whole process group (the driver and Ray's processes)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _search_command(tmp_path, 4, "--set", "train.max_steps=80 search.early_stopping.enabled=false")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(tmp_path, uri), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    client = MlflowClient(tracking_uri=uri)
    try:
        _watch(client, lambda runs: len([r for r in _trials(runs) if r.info.status == "RUNNING"]) == 2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: state saved; continue with --resume" in err
    runs = _runs(client)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in _trials(runs) if r.info.status == "KILLED"]
    assert len(killed) == 2, [(r.info.run_name, r.info.status) for r in _trials(runs)]
    assert _parent(runs).info.status == "KILLED"


@pytest.mark.distributed
@pytest.mark.e2e
def test_mlflow_run_search_with_two_ray_workers_on_sqlite(tmp_path):
    cmd = mlflow_run_command(
        "search",
        "dist-e2e",
        "n_trials=4",
        "set="
        + _overrides(
            tmp_path,
            **{
                "search.early_stopping.enabled": False,
                "train.max_steps": 8,
                # One seed replicate of the best configuration and of the baseline: on the workers too.
                "search.replicates.top_k": 1,
                "search.replicates.seeds": 1,
            },
        ),
    )
    env = _env(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = _runs(client, "dist-e2e")
    parent = _parent(runs)
    replicates = [r for r in runs if names.TRIAL_REPLICATE_OF in r.data.tags]
    assert len(replicates) == 2 and all(r.info.status == "FINISHED" for r in replicates)
    assert all(r.data.tags[names.TRIAL_WORKER] in ("w1", "w2") for r in replicates)
    assert "baseline" in {r.data.tags[names.TRIAL_REPLICATE_OF] for r in replicates}
    trials = [r for r in _trials(runs) if names.TRIAL_REPLICATE_OF not in r.data.tags]
    assert parent.info.status == "FINISHED" and len(trials) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert {r.data.tags[names.TRIAL_WORKER] for r in trials} == {"w1", "w2"}
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.distributed
def test_a_ray_worker_packs_its_trials(tmp_path):
    """`search.pack: 2` with one worker: the worker runs two trials at once as one pack; each
    is its own nested run, tagged with the worker's pack and its place in it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = _overrides(
        tmp_path,
        **{
            "search.workers": 1,
            "search.pack": 2,
            "search.early_stopping.enabled": False,
            "train.max_steps": 8,
        },
    )
    cmd = [*(sys.executable, "-m", "pipeline", "search", "--config", str(DEMO_CONFIG)), "--n-trials", "4"]
    p = subprocess.run(
        [*cmd, "--set", sets], cwd=ROOT, env=_env(tmp_path, uri), capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    trials = _trials(_runs(MlflowClient(tracking_uri=uri)))
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    assert {r.data.tags[names.TRIAL_WORKER] for r in trials} == {"w1"}
    assert {r.data.tags[names.TRIAL_PACK_SLOT] for r in trials} == {"0", "1"}
    assert all(r.data.tags[names.TRIAL_PACK].startswith("w1.") for r in trials)
