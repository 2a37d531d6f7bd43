"""Running on a cluster: the compiled pipeline's Kubernetes settings (golden), the parity
lint, Beam runner options, and submit / schedule / runs through the real kfp.Client
against a local HTTP server that answers the KFP v2 REST endpoints the client calls."""
from __future__ import annotations

import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from segflow.cli import main
from segflow.config.experiment import load_config
from segflow.utils.errors import ConfigError
from segflow.pipelines.pipeline import compile_pipeline

HERE = Path(__file__).resolve().parents[1]
GOLDEN_CONFIG = HERE / "fixtures" / "golden.yaml"
CLUSTER_CONFIG = HERE / "fixtures" / "golden-cluster.yaml"
CLUSTER_GOLDEN = HERE / "golden" / "pipeline-cluster.yaml"
DATA_TASKS = ("dataset-fingerprint", "example-gen", "statistics-gen", "schema-gen", "example-validator", "transform", "evaluator", "exporter", "pusher")


# ---------------------------------------------------------------- compiled Kubernetes settings


def test_cluster_pipeline_matches_golden(tmp_path: Path) -> None:
    """The cluster config compiles to tests/golden/pipeline-cluster.yaml (SEGFLOW_UPDATE_GOLDEN=1 rewrites it)."""
    compiled = compile_pipeline(load_config(CLUSTER_CONFIG), tmp_path / "cluster.yaml")
    if os.environ.get("SEGFLOW_UPDATE_GOLDEN"):
        CLUSTER_GOLDEN.write_text(compiled.read_text())
    assert compiled.read_text() == CLUSTER_GOLDEN.read_text(), "compiled cluster pipeline changed; run `make golden` if intended"


def _golden_cluster() -> tuple[dict, dict, dict]:
    """(pipeline spec, platform spec's executors, deployment executors) of the cluster golden."""
    documents = list(yaml.safe_load_all(CLUSTER_GOLDEN.read_text()))
    spec = documents[0]
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec, platform, spec["deploymentSpec"]["executors"]


def test_cluster_golden_has_the_trainers_gpu_pool_and_the_data_pool() -> None:
    spec, platform, executors = _golden_cluster()
    trainer = platform["exec-trainer"]
    assert trainer["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4", "segflow.dev/pool": "gpu"}
    assert trainer["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    accelerator = executors["exec-trainer"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "2"
    assert executors["exec-trainer"]["container"]["image"] == "registry.example.com/ml/segflow-gpu:1.2.3"
    for task in DATA_TASKS:
        executor = f"exec-{task}"
        assert platform[executor]["nodeSelector"]["labels"] == {"segflow.dev/pool": "cpu"}, task
        assert "tolerations" not in platform[executor] and "accelerator" not in executors[executor]["container"].get("resources", {}), task
        assert executors[executor]["container"]["image"] == "registry.example.com/ml/segflow:1.2.3", task


def test_cluster_golden_has_resources_retries_caching_secrets_pvc_and_root() -> None:
    spec, platform, executors = _golden_cluster()
    resources = {name: executors[f"exec-{name}"]["container"]["resources"] for name in ("trainer", "example-gen", "pusher")}
    assert {key: resources["trainer"][key] for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit")} == {
        "resourceCpuRequest": "4", "resourceCpuLimit": "8", "resourceMemoryRequest": "16Gi", "resourceMemoryLimit": "32Gi",
    }
    # example_gen's own cpu over the default entry, field by field; the pusher takes the default.
    assert (resources["example-gen"]["resourceCpuRequest"], resources["example-gen"]["resourceMemoryLimit"]) == ("2", "4Gi")
    assert (resources["pusher"]["resourceCpuRequest"], resources["pusher"]["resourceMemoryRequest"]) == ("500m", "2Gi")
    assert "resourceCpuLimit" not in resources["pusher"]
    # The steps of the root DAG and of the dsl.If (exporter, pusher), without the condition itself.
    dags = [spec["root"]["dag"], *(component["dag"] for component in spec["components"].values() if "dag" in component)]
    tasks = {name: task for dag in dags for name, task in dag["tasks"].items() if not task["componentRef"]["name"].startswith("comp-condition")}
    assert {"exporter", "pusher"} <= set(tasks)
    assert all(task["retryPolicy"]["maxRetryCount"] == 2 for task in tasks.values())
    uncached = ("dataset-fingerprint", "retrain-gate", "evaluator", "pusher")
    assert all(tasks[name]["cachingOptions"] == {} for name in uncached)
    assert all(task["cachingOptions"] == {"enableCache": True} for name, task in tasks.items() if name not in uncached)
    for executor in platform.values():
        assert executor["pvcMount"][0]["mountPath"] == "/mnt/segflow" and executor["pvcMount"][0]["constant"] == "segflow-artifacts"
        (secret,) = executor["secretAsEnv"]
        assert secret["secretName"] == "object-store"
        assert {entry["envVar"]: entry["secretKey"] for entry in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID": "access_key", "AWS_SECRET_ACCESS_KEY": "secret_key"}
    assert spec["defaultPipelineRoot"] == "s3://segflow-golden/pipeline-root"
    text = CLUSTER_GOLDEN.read_text()
    assert "AWS_SECRET_ACCESS_KEY" in text and "value: " not in text.split("platforms:")[1]  # references only, never a literal


def test_no_kubernetes_settings_compile_no_platform_spec(tmp_path: Path) -> None:
    """The default config: the default image, no platform section, no retries, no resources."""
    text = compile_pipeline(load_config(GOLDEN_CONFIG), tmp_path / "p.yaml").read_text()
    assert "platforms:" not in text and "retryPolicy" not in text and "resources:" not in text
    from segflow.cluster.kfp_base import BASE_IMAGE

    executors = yaml.safe_load(text)["deploymentSpec"]["executors"]
    assert {executor["container"]["image"] for executor in executors.values()} == {BASE_IMAGE}


def test_compile_flag_overrides_the_configs_pipeline_root(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    assert main(["compile", str(CLUSTER_CONFIG), "-o", str(path), "--pipeline-root", "minio://mlpipeline/v2/artifacts"]) == 0
    assert yaml.safe_load_all(path.read_text()).__next__()["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"


def test_kubernetes_settings_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(GOLDEN_CONFIG)
    cases = {
        "kubernetes.resources={trainr: {cpu: '1'}}": "kubernetes.resources: unknown component 'trainr'",
        "kubernetes.resources={trainer: {memory: lots}}": "kubernetes.resources.trainer.memory: 'lots'",
        "kubernetes.pipeline_root=runs/root": "relative kubernetes.pipeline_root 'runs/root'",
        "kubernetes.trainer_pool={accelerator_type: nvidia.com/gpu}": "needs accelerator_count >= 1",
    }
    for override, message in cases.items():
        assert main(["compile", config, "-o", str(tmp_path / "p.yaml"), "--set", override]) == 2, override
        assert message in capsys.readouterr().err, override
    assert not (tmp_path / "p.yaml").exists()


def test_accelerator_count_alone_requests_nvidia_gpus(tmp_path: Path) -> None:
    config = load_config(GOLDEN_CONFIG, ["kubernetes.trainer_pool.accelerator_count=1"])
    executors = yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text()).__next__()["deploymentSpec"]["executors"]
    assert executors["exec-trainer"]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert executors["exec-trainer"]["container"]["image"] == load_config(GOLDEN_CONFIG).kubernetes.image  # no gpu_image: the image


def test_a_multi_worker_trainer_step_is_a_launcher_in_the_data_pool(tmp_path: Path) -> None:
    """With trainer.workers 2 the GPUs, the trainer pool and the trainer's resources go to the
    worker pods (k8s_objects), not to the step that launches them."""
    config = load_config(CLUSTER_CONFIG, ["trainer.workers=2"])
    documents = list(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text()))
    executor = documents[0]["deploymentSpec"]["executors"]["exec-trainer"]["container"]
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-trainer"]
    assert "accelerator" not in executor.get("resources", {}) and executor["image"] == config.kubernetes.image
    assert platform["nodeSelector"]["labels"] == {"segflow.dev/pool": "cpu"} and "tolerations" not in platform


# ---------------------------------------------------------------- parity lint


def test_compile_warns_about_every_setting_kfp_local_ignores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(CLUSTER_CONFIG), "-o", str(tmp_path / "p.yaml")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("segflow: warning: ")]
    keys = [line.removeprefix("segflow: warning: ").split(":", 1)[0] for line in warnings]
    assert keys == [
        "kubernetes.trainer_pool.accelerator_count",
        "kubernetes.trainer_pool.node_selector",
        "kubernetes.trainer_pool.tolerations",
        "kubernetes.data_pool.node_selector",
        "kubernetes.resources.default.cpu",
        "kubernetes.resources.default.memory",
        "kubernetes.resources.default.memory_limit",
        "kubernetes.resources.trainer.cpu",
        "kubernetes.resources.trainer.memory",
        "kubernetes.resources.trainer.cpu_limit",
        "kubernetes.resources.trainer.memory_limit",
        "kubernetes.resources.example_gen.cpu",
        "kubernetes.retries",
        "kubernetes.secrets",
        "kubernetes.pvc",
        "kubernetes.pipeline_root",
    ]
    assert all("kfp.local (segflow run) ignores it" in line for line in warnings)
    assert "2 x nvidia.com/gpu" in warnings[0] and "retried up to 2 times" in warnings[12]
    assert "wrote" in captured.out
    assert main(["compile", str(GOLDEN_CONFIG), "-o", str(tmp_path / "q.yaml")]) == 0
    assert "warning" not in capsys.readouterr().err  # nothing set, nothing to warn about


def test_local_run_warns_that_it_ignores_cluster_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`segflow run` says so before it starts (the run itself is stubbed out here)."""
    import segflow.pipelines.local as local

    def stub(config: Any, output: Any, **kwargs: Any) -> dict:
        return {"status": "succeeded", "components": {}}

    monkeypatch.setattr(local, "run_local", stub)
    assert main(["run", str(CLUSTER_CONFIG), "-o", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "segflow: warning: kubernetes.retries is ignored by this local run (kfp.local); on the cluster: a failed step is retried up to 2 times" in err
    assert "kubernetes.trainer_pool.accelerator_count is ignored by this local run" in err
    assert "kubernetes.pvc is ignored by this local run" in err


# ---------------------------------------------------------------- Beam runners


BEAM_CASES = {
    "DirectRunner": ({"direct_running_mode": "in_memory"}, {"sdk_location": "container"}, "direct_running_mode: set by beam.running_mode"),
    "DataflowRunner": (
        {"project": "my-project"},
        {"project": "my-project", "region": "europe-west1", "temp_location": "gs://segflow-beam/tmp", "machine_type": "n2-standard-4", "max_num_workers": 10},
        "region: required by DataflowRunner",
    ),
    "FlinkRunner": ({"flink_version": "0.9"}, {"flink_master": "flink-jobmanager:8081", "environment_type": "EXTERNAL", "environment_config": "localhost:50000", "parallelism": 4}, "flink_version"),
    "SparkRunner": ({"spark_master": "spark://x:7077"}, {"spark_master_url": "spark://spark-master:7077", "environment_type": "LOOPBACK"}, "spark_master: not an option"),
}


@pytest.mark.parametrize("runner", sorted(BEAM_CASES))
def test_beam_runner_options_are_checked_by_beams_option_classes(runner: str) -> None:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from segflow.utils.runtime import beam_options

    bad, good, message = BEAM_CASES[runner]
    with pytest.raises(ConfigError) as error:
        load_config(GOLDEN_CONFIG, [f"beam={json.dumps({'runner': runner, 'options': bad})}"])
    assert "beam:" in str(error.value) and message in str(error.value)
    config = load_config(GOLDEN_CONFIG, [f"beam={json.dumps({'runner': runner, 'options': good})}"])
    options = beam_options(config.beam, "/tmp/segflow-beam")
    assert isinstance(options, PipelineOptions) and options.view_as(StandardOptions).runner == runner
    given = options.get_all_options(drop_default=True)
    assert all(given[name] == value for name, value in good.items() if name != "sdk_location")
    expected_temp = good.get("temp_location", "/tmp/segflow-beam")
    assert given["temp_location"] == expected_temp


def test_dataflow_needs_a_gcs_temp_location_and_a_valid_project() -> None:
    options = {"project": "123", "region": "europe-west1", "temp_location": "/tmp/local"}
    with pytest.raises(ConfigError) as error:
        load_config(GOLDEN_CONFIG, [f"beam={json.dumps({'runner': 'DataflowRunner', 'options': options})}"])
    assert "temp_location" in str(error.value) and "123" in str(error.value)


def test_default_runner_keeps_the_direct_runner_settings() -> None:
    from segflow.utils.runtime import beam_options

    config = load_config(GOLDEN_CONFIG, ["beam.running_mode=multi_processing", "beam.num_workers=3"])
    given = beam_options(config.beam, "/tmp/x").get_all_options()
    assert (given["runner"], given["direct_running_mode"], given["direct_num_workers"], given["temp_location"]) == ("DirectRunner", "multi_processing", 3, "/tmp/x")


# ---------------------------------------------------------------- submit / schedule / runs


class FakeKubeflow(ThreadingHTTPServer):
    """The KFP v2beta1 REST endpoints kfp.Client calls here, answering like the API server
    and recording every request (method, path, query, JSON body, Authorization header)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.experiments: list[dict[str, Any]] = [{"experiment_id": "exp-existing", "display_name": "existing"}]
        self.fail_runs = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def posted(self, path: str) -> list[dict[str, Any]]:
        return [request["body"] for request in self.requests if request["method"] == "POST" and request["path"] == path]


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubeflow

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> tuple[str, dict[str, list[str]], Any]:
        parsed = urllib.parse.urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        query = urllib.parse.parse_qs(parsed.query)
        self.server.requests.append({"method": self.command, "path": parsed.path, "query": query, "body": body, "authorization": self.headers.get("Authorization")})
        return parsed.path, query, body

    def do_GET(self) -> None:
        path, query, _ = self._record()
        if path == "/apis/v2beta1/healthz":
            return self._answer(200, {"multi_user": False})
        if path == "/apis/v2beta1/experiments":
            wanted = [p["string_value"] if "string_value" in p else p.get("stringValue") for p in json.loads(query["filter"][0])["predicates"]] if "filter" in query else None
            found = [e for e in self.server.experiments if wanted is None or e["display_name"] in wanted]
            return self._answer(200, {"experiments": found, "total_size": len(found)} if found else {})
        if path == "/apis/v2beta1/runs":
            runs = [
                {"run_id": "run-2", "display_name": "segflow-demo b", "state": "RUNNING", "created_at": "2026-05-04T03:00:00Z"},
                {"run_id": "run-1", "display_name": "segflow-demo a", "state": "SUCCEEDED", "created_at": "2026-05-03T03:00:00Z", "finished_at": "2026-05-03T04:10:00Z"},
            ]
            return self._answer(200, {"runs": runs[: int(query.get("page_size", ["10"])[0])], "total_size": 2})
        self._answer(404, {"error": f"no route {path}", "code": 5})

    def do_POST(self) -> None:
        path, _, body = self._record()
        if path == "/apis/v2beta1/experiments":
            experiment = {**body, "experiment_id": f"exp-{len(self.server.experiments)}"}
            self.server.experiments.append(experiment)
            return self._answer(200, experiment)
        if path == "/apis/v2beta1/runs":
            if self.server.fail_runs:
                return self._answer(400, {"error": "Failed to create a run: invalid pipeline spec", "code": 3})
            return self._answer(200, {**body, "run_id": "run-42", "state": "PENDING"})
        if path == "/apis/v2beta1/recurringruns":
            return self._answer(200, {**body, "recurring_run_id": "rr-7", "status": "ENABLED"})
        self._answer(404, {"error": f"no route {path}", "code": 5})


@pytest.fixture
def kubeflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeflow]:
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))  # not the user's ~/.config/kfp
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "SEGFLOW_KFP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    server = FakeKubeflow()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_submit_compiles_and_creates_a_run_with_the_pipeline_spec(kubeflow: FakeKubeflow, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["submit", str(CLUSTER_CONFIG), "--host", kubeflow.url, "--experiment", "nightly", "--existing-token", "t0ken", "--set", "stages.0.epochs=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"url: {kubeflow.url}/#/runs/details/run-42" in out and "experiment: nightly" in out
    (experiment,) = kubeflow.posted("/apis/v2beta1/experiments")
    assert experiment["display_name"] == "nightly"
    (run,) = kubeflow.posted("/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-1" and run["display_name"].startswith("segflow-golden-cluster ")
    assert run["runtime_config"]["parameters"] == {
        "images": "gs://segflow-golden/images", "masks": "gs://segflow-golden/masks", "registry": "gs://segflow-golden/registry",
    }
    assert run["service_account"] == "segflow-launcher"
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "segflow-golden-cluster" and spec["defaultPipelineRoot"] == "s3://segflow-golden/pipeline-root"
    trained = spec["components"]["comp-condition-1"]["dag"]["tasks"]["trainer"]  # inside the retrain gate's dsl.If
    assert '"epochs":3' in trained["inputs"]["parameters"]["config_slice"]["runtimeValue"]["constant"]
    trainer = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-trainer"]
    assert trainer["nodeSelector"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-tesla-t4"
    assert all(request["authorization"] == "Bearer t0ken" for request in kubeflow.requests)


def test_submit_reuses_an_existing_experiment_and_passes_auth_options(kubeflow: FakeKubeflow, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["submit", str(GOLDEN_CONFIG), "--host", kubeflow.url, "--experiment", "existing", "--namespace", "team-a", "--service-account", "", "--force"]
    assert main(argv) == 0
    assert kubeflow.posted("/apis/v2beta1/experiments") == []
    (run,) = kubeflow.posted("/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-existing" and "service_account" not in run
    assert run["runtime_config"]["parameters"]["force"] is True  # trains even with nothing new
    assert "platform_spec" not in run["pipeline_spec"]  # nothing Kubernetes-specific in the default config
    lookups = [request for request in kubeflow.requests if request["method"] == "GET" and request["path"] == "/apis/v2beta1/experiments"]
    assert lookups and all(request["query"].get("namespace") == ["team-a"] for request in lookups)


def test_schedule_creates_a_recurring_run(kubeflow: FakeKubeflow, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["schedule", str(CLUSTER_CONFIG), "--host", kubeflow.url, "--cron", "0 3 * * 1", "--max-concurrency", "2", "--no-catchup", "--experiment", "weekly"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rr-7" in out and "'0 0 3 * * 1'" in out and f"{kubeflow.url}/#/recurringrun/details/rr-7" in out
    (recurring,) = kubeflow.posted("/apis/v2beta1/recurringruns")
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert recurring["max_concurrency"] == "2" or recurring["max_concurrency"] == 2
    assert recurring["no_catchup"] is True and recurring["mode"] == "ENABLE"
    assert recurring["experiment_id"] == "exp-1" and recurring["display_name"] == "segflow-golden-cluster retraining"
    assert recurring["runtime_config"]["parameters"]["images"] == "gs://segflow-golden/images"
    assert recurring["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "segflow-golden-cluster"
    assert "platform_spec" in recurring["pipeline_spec"]
    # The compiled pipeline of the golden file: a quiet night stops at the retrain gate; a scheduled run never forces.
    assert recurring["pipeline_spec"]["pipeline_spec"] == _golden_cluster()[0]
    assert "retrain-gate" in recurring["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert "force" not in recurring["runtime_config"]["parameters"]


def test_schedule_defaults_and_bad_cron(kubeflow: FakeKubeflow, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", str(GOLDEN_CONFIG), "--host", kubeflow.url, "--cron", "0 0 3 * * 1"]) == 0
    (recurring,) = kubeflow.posted("/apis/v2beta1/recurringruns")
    assert int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is False and recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    capsys.readouterr()
    assert main(["schedule", str(GOLDEN_CONFIG), "--host", kubeflow.url, "--cron", "3 * *"]) == 2
    assert "--cron '3 * *'" in capsys.readouterr().err
    assert len(kubeflow.posted("/apis/v2beta1/recurringruns")) == 1


def test_runs_lists_recent_runs_with_states(kubeflow: FakeKubeflow, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--host", kubeflow.url, "--limit", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "RUNNING" and "run-2" in lines[0] and lines[1].split()[0] == "SUCCEEDED"
    (listing,) = [request for request in kubeflow.requests if request["path"] == "/apis/v2beta1/runs"]
    assert listing["query"]["page_size"] == ["5"] and listing["query"]["sort_by"] == ["created_at desc"]
    assert main(["runs", "--host", kubeflow.url, "--limit", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["run_id"] == "run-2" and row["state"] == "RUNNING" and row["url"] == f"{kubeflow.url}/#/runs/details/run-2"


def test_submit_errors_are_reported_without_a_traceback(kubeflow: FakeKubeflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kubeflow.fail_runs = True
    assert main(["submit", str(GOLDEN_CONFIG), "--host", kubeflow.url]) == 1
    err = capsys.readouterr().err
    assert "answered 400" in err and "invalid pipeline spec" in err
    # Relative paths are an error before anything is sent, as in compile.
    monkeypatch.chdir(tmp_path)
    relative = tmp_path / "relative.yaml"
    relative.write_text("name: rel\ndataset: {images: data/images, masks: data/masks}\n")
    requests = len(kubeflow.requests)
    assert main(["submit", str(relative), "--host", kubeflow.url]) == 2
    assert "relative path in a compiled pipeline" in capsys.readouterr().err and len(kubeflow.requests) == requests


def test_unreachable_host_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["runs", "--host", f"http://127.0.0.1:{port}"]) == 1
    assert f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}" in capsys.readouterr().err
