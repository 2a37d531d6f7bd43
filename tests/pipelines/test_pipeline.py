"""The DAG: golden compiled YAML, kfp's own loader, and kfp.local runs through the CLI."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from segflow.cli import main
from segflow.config.experiment import load_config
from segflow.utils.io import encode_png
from segflow.pipelines.pipeline import compile_pipeline

HERE = Path(__file__).resolve().parents[1]
GOLDEN = HERE / "golden" / "pipeline.yaml"
GOLDEN_KFOLD = HERE / "golden" / "pipeline-kfold.yaml"


def test_compiled_pipeline_matches_golden(tmp_path: Path) -> None:
    """Any change to the compiled DAG is deliberate: `make golden` rewrites the file."""
    compiled = compile_pipeline(load_config(HERE / "fixtures" / "golden.yaml"), tmp_path / "pipeline.yaml")
    if os.environ.get("SEGFLOW_UPDATE_GOLDEN"):
        GOLDEN.write_text(compiled.read_text())
    assert compiled.read_text() == GOLDEN.read_text(), "compiled pipeline changed; run `make golden` if intended"


def test_compiled_kfold_pipeline_matches_golden(tmp_path: Path) -> None:
    """A k-fold config with a test folder: a ParallelFor of trainer and evaluator over the
    trained folds, their outputs collected by cross_validation; no exporter or pusher."""
    overrides = ["dataset.folds=5", "dataset.folds_to_train=[0, 1, 3]", "dataset.eval_split=null", "dataset.test={images: /data/test/images, masks: /data/test/masks}"]
    compiled = compile_pipeline(load_config(HERE / "fixtures" / "golden.yaml", overrides), tmp_path / "pipeline.yaml")
    if os.environ.get("SEGFLOW_UPDATE_GOLDEN"):
        GOLDEN_KFOLD.write_text(compiled.read_text())
    assert compiled.read_text() == GOLDEN_KFOLD.read_text(), "compiled pipeline changed; run `make golden` if intended"
    spec = yaml.safe_load(compiled.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"dataset-fingerprint", "example-gen", "statistics-gen", "schema-gen", "example-validator", "transform", "for-loop-2", "cross-validation"}
    assert tasks["for-loop-2"]["parameterIterator"]["items"]["raw"] == "[0, 1, 3]"
    assert set(spec["components"]["comp-for-loop-2"]["dag"]["tasks"]) == {"trainer", "evaluator"}
    assert spec["root"]["inputDefinitions"]["parameters"]["test_images"]["defaultValue"] == "/data/test/images"


def test_compiled_yaml_loads_with_kfp_loader(tmp_path: Path) -> None:
    from kfp import components

    path = tmp_path / "pipeline.yaml"
    assert main(["compile", str(HERE / "fixtures" / "golden.yaml"), "-o", str(path)]) == 0
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "segflow-golden"
    spec = yaml.safe_load(path.read_text())
    root = spec["root"]["dag"]["tasks"]
    # Nothing new since the registry's current version: everything after the gate is skipped.
    assert set(root) == {"dataset-fingerprint", "retrain-gate", "condition-1"}
    assert root["condition-1"]["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--retrain-gate-Output'] == true"
    assert root["retrain-gate"]["inputs"]["parameters"]["force"] == {"componentInputParameter": "force"}
    tasks = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    dag = ["example-gen", "statistics-gen", "schema-gen", "example-validator", "transform", "trainer", "evaluator", "condition-2"]
    assert set(tasks) == set(dag)
    assert "example-validator" in tasks["trainer"]["dependentTasks"]
    # Exporter and pusher run only for a blessed model: inside a dsl.If on the evaluator's output.
    blessed = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert set(blessed) == {"exporter", "pusher"}
    assert tasks["condition-2"]["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluator-Output'] == true"
    # Never cached: the fingerprint looks at the data as it is now, the gate, the blessing and the push at the registry as it is now.
    uncached = (root["dataset-fingerprint"], root["retrain-gate"], tasks["evaluator"], blessed["pusher"])
    assert all(task["cachingOptions"] == {} for task in uncached)
    cached = [task for name, task in {**tasks, **blessed}.items() if name not in ("evaluator", "condition-2", "pusher")]
    assert all(task["cachingOptions"] == {"enableCache": True} for task in cached)


def _compiled(tmp_path: Path, *overrides: str, kind: str = "train") -> dict:
    path = compile_pipeline(load_config(HERE / "fixtures" / "golden.yaml", list(overrides)), tmp_path / f"{len(overrides)}-{kind}.yaml", kind=kind)
    return yaml.safe_load(path.read_text())


def test_locations_are_pipeline_parameters_with_the_config_as_defaults(tmp_path: Path) -> None:
    compiled = _compiled(tmp_path)
    parameters = compiled["root"]["inputDefinitions"]["parameters"]
    assert {name: entry["defaultValue"] for name, entry in parameters.items()} == {
        "images": "gs://segflow-golden/images",
        "masks": "gs://segflow-golden/masks",
        **{name: "" for name in ("eval_images", "eval_masks", "test_images", "test_masks")},  # no named eval/test folders
        "registry": "gs://segflow-golden/registry",
        "force": False,
    }
    dataset_parameters = {"images", "masks", "eval_images", "eval_masks", "test_images", "test_masks"}
    assert set(_compiled(tmp_path, kind="validate")["root"]["inputDefinitions"]["parameters"]) == dataset_parameters | {"registry"}  # baseline_statistics: current
    from segflow.config.component_config import COMPONENT_LOCATIONS

    for name, task in _dag_tasks(compiled).items():
        # A pipeline parameter; inside a dsl.If, the condition's channel of it (not of another task's output).
        taken = {
            key for key, value in task["inputs"].get("parameters", {}).items()
            if value.get("componentInputParameter", "").removeprefix("pipelinechannel--") in parameters
        }
        expected = dataset_parameters if name == "dataset-fingerprint" else set(COMPONENT_LOCATIONS.get(name.replace("-", "_"), ()))
        expected |= {"force"} if name == "retrain-gate" else set()
        assert taken == expected, name
    assert "gs://segflow-golden" not in yaml.safe_dump(compiled["root"]["dag"])  # only as the parameters' defaults


def _dag_tasks(compiled: dict) -> dict:
    """Every step of the pipeline: the root DAG's and those inside its dsl.If (exporter, pusher),
    without the condition task itself."""
    dags = [compiled["root"]["dag"], *(component["dag"] for component in compiled["components"].values() if "dag" in component)]
    return {name: task for dag in dags for name, task in dag["tasks"].items() if not task["componentRef"]["name"].startswith("comp-condition")}


def _cache_inputs(compiled: dict) -> dict:
    """What KFP's cache key of each task is made of: its inputs and its component."""
    components, executors = compiled["components"], compiled["deploymentSpec"]["executors"]
    keys = {}
    for name, task in _dag_tasks(compiled).items():
        spec = components[task["componentRef"]["name"]]
        keys[name] = (task["inputs"], spec, executors[spec["executorLabel"]])
    return keys


def test_epochs_change_only_the_trainers_cache_key(tmp_path: Path) -> None:
    """Each task gets only the config keys its core reads: a new epoch count keeps the
    data components' (and the evaluator's and exporter's) cached results. (The gate and the
    pusher, never cached, take the whole config's hash: it is compared with and recorded in
    the version's lineage.)"""
    before, after = _cache_inputs(_compiled(tmp_path)), _cache_inputs(_compiled(tmp_path, "stages.0.epochs=7"))
    assert sorted(name for name in before if before[name] != after[name]) == ["pusher", "retrain-gate", "trainer"]
    exported = _cache_inputs(_compiled(tmp_path, "export=[saved_model]", "evaluation.min_mean_iou=0.5"))
    assert sorted(name for name in before if before[name] != exported[name]) == ["evaluator", "exporter", "pusher", "retrain-gate"]


def test_compile_rejects_relative_locations_or_resolves_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A relative path in a compiled pipeline would be resolved in the pods' working directory."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "relative.yaml"
    config.write_text("name: rel\ndataset: {images: data/images, masks: s3://bucket/masks}\nvalidation: {schema: runs/old/schema}\n")
    assert main(["compile", str(config), "-o", "p.yaml"]) == 2
    error = capsys.readouterr().err
    named = ("dataset.images 'data/images'", "push.registry 'model-registry'", "validation.schema 'runs/old/schema'", "absolute path", "gs:// / s3:// URI")
    assert all(text in error for text in (*named, "--resolve-paths"))
    assert "dataset.masks" not in error and not (tmp_path / "p.yaml").exists()
    assert main(["compile", str(config), "-o", "v.yaml", "--pipeline", "validate", "--set", "validation.schema=/runs/old/schema"]) == 2
    assert "dataset.images" in capsys.readouterr().err
    assert main(["compile", str(config), "-o", "v.yaml", "--pipeline", "validate", "--set", "validation.schema=/s", "--set", "dataset.images=/i"]) == 0
    assert main(["compile", str(config), "-o", "p.yaml", "--resolve-paths"]) == 0
    compiled = yaml.safe_load((tmp_path / "p.yaml").read_text())
    defaults = {name: entry["defaultValue"] for name, entry in compiled["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults == {
        "images": str(tmp_path / "data" / "images"), "masks": "s3://bucket/masks", "registry": str(tmp_path / "model-registry"), "force": False,
        **{name: "" for name in ("eval_images", "eval_masks", "test_images", "test_masks")},
    }
    validator = compiled["components"]["comp-condition-1"]["dag"]["tasks"]["example-validator"]["inputs"]["parameters"]  # inside the retrain gate's dsl.If
    assert str(tmp_path / "runs" / "old" / "schema") in validator["config_slice"]["runtimeValue"]["constant"]


@pytest.mark.parametrize("kind", ["train", "validate"])
def test_compile_sets_the_default_pipeline_root(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--pipeline-root becomes defaultPipelineRoot; a relative one is an error naming it;
    without it the YAML has no root (the golden test checks the rest is unchanged)."""
    config = str(HERE / "fixtures" / "golden.yaml")
    for root in ("gs://segflow-golden/pipeline-root", "/mnt/pipeline-root"):
        path = tmp_path / f"{kind}.yaml"
        assert main(["compile", config, "-o", str(path), "--pipeline", kind, "--pipeline-root", root]) == 0
        assert yaml.safe_load(path.read_text())["defaultPipelineRoot"] == root
    assert "defaultPipelineRoot" not in _compiled(tmp_path, kind=kind)
    capsys.readouterr()
    assert main(["compile", config, "-o", str(tmp_path / "relative.yaml"), "--pipeline", kind, "--pipeline-root", "runs/root"]) == 2
    error = capsys.readouterr().err
    assert "--pipeline-root 'runs/root'" in error and "absolute path" in error and "gs:// / s3:// URI" in error
    assert not (tmp_path / "relative.yaml").exists()


def test_validate_pipeline_compiles_without_training(tmp_path: Path) -> None:
    path = tmp_path / "validate.yaml"
    assert main(["compile", str(HERE / "fixtures" / "golden.yaml"), "-o", str(path), "--pipeline", "validate"]) == 0
    assert "trainer" not in yaml.safe_load(path.read_text())["root"]["dag"]["tasks"]


def test_cli_list_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "losses"]) == 0
    assert "dice" in capsys.readouterr().out
    assert main(["list", "exports", "--json"]) == 0
    assert {row["format"] for row in json.loads(capsys.readouterr().out)} >= {"saved_model", "tflite_int8"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {images: a, masks: b}\nmodel: {dpeth: 3}\n")
    assert main(["run", str(bad), "-o", str(tmp_path / "run")]) == 2
    assert "model.dpeth: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # rejected before any work started


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    assert main(["demo-data", str(tmp_path / "a"), "--count", "3"]) == 0
    assert main(["demo-data", str(tmp_path / "b"), "--count", "3"]) == 0
    for name in ("images/000.png", "masks/002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _write_config(tiny_data: Path, tmp_path: Path) -> Path:
    from tests.conftest import tiny_raw_config

    raw = tiny_raw_config(tiny_data, push={"registry": str(tmp_path / "registry")})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.extended  # a DAG run through the CLI beyond the default suite's one full run
def test_kfp_local_validate_run(tiny_data: Path, tmp_path: Path) -> None:
    config = _write_config(tiny_data, tmp_path)
    assert main(["validate", str(config), "-o", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    components = ["dataset_fingerprint", "example_gen", "statistics_gen", "schema_gen", "example_validator"]
    assert summary["status"] == "succeeded" and list(summary["components"]) == components
    assert summary["counts"]["examples_in"] == 20
    listing = json.loads((tmp_path / "run" / "dataset_fingerprint" / "listing" / "listing.json").read_text())
    assert len(listing["fingerprint"]) == 64 and len(listing["images"]) == len(listing["masks"]) == 20


def test_kfp_local_full_run_writes_the_summary_contract(tiny_data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The whole DAG through the CLI on data with one corrupt PNG, one image without a mask
    and one mask with an unexpected value: the run completes on the other 17, and its
    console reads like a progress report (tests/test_console.py)."""
    from tests.test_console import check_default_console

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "images" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (data / "masks" / "004.png").unlink()
    (data / "masks" / "005.png").write_bytes(encode_png(np.full((32, 32), 7, np.uint8)))
    config = _write_config(data, tmp_path)
    run = tmp_path / "run"
    assert main(["run", str(config), "-o", str(run), "--set", "export=[saved_model, tflite_int8]"]) == 0
    out, err = capfd.readouterr()
    assert "mean IoU (eval)" in out
    check_default_console(out, err, run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert len(summary["config_hash"]) == 64 and len(summary["data_fingerprint"]) == 64
    assert all(entry["status"] == "succeeded" and entry["seconds"] >= 0 for entry in summary["components"].values())
    assert len(summary["components"]) == 11
    counts = summary["counts"]
    assert counts["examples_in"] == counts["examples_written"] + counts["quarantined"] == 20 and counts["quarantined"] == 3
    quarantined = [json.loads(line) for line in Path(summary["quarantine"]).read_text().splitlines()]
    assert sorted(Path(entry["file"]).name for entry in quarantined) == ["003.png", "004.png", "005.png"]
    assert all(entry["reason"] for entry in quarantined)
    assert 0.0 <= summary["metrics"]["eval"]["mean_iou"] <= 1.0 and summary["blessed"] is True
    for name in ("saved_model", "tflite_int8"):
        assert Path(summary["exports"][name]["path"]).exists() and summary["exports"][name]["bytes"] > 0
    assert summary["push"]["pushed"] and Path(summary["push"]["destination"]).is_dir()
    assert summary["push"]["current"] is True and summary["push"]["previous"] is None  # the registry's first version serves
    lineage = json.loads((Path(summary["push"]["destination"]) / "lineage.json").read_text())
    assert (lineage["config_hash"], lineage["examples_fingerprint"]) == (summary["config_hash"], summary["data_fingerprint"])
    assert lineage["counts"] == counts and lineage["metrics"]["mean_iou"] == summary["metrics"]["eval"]["mean_iou"]
    assert len(lineage["dataset_fingerprint"]) == 64 and lineage["run"] == str(run)
    assert load_config(run / "config.yaml").export.formats == ["saved_model", "tflite_int8"]
    assert (run / "trainer" / "model_run" / "history.csv").exists() and not (run / ".kfp").exists()
    # A second run into the same folder is refused rather than mixing artifacts.
    assert main(["run", str(config), "-o", str(run)]) == 2


@pytest.mark.extended  # a DAG run through the CLI beyond the default suite's one full run
def test_failed_component_gives_failed_summary_and_exit_code(tiny_data: Path, tmp_path: Path) -> None:
    """validation.on_anomaly 'fail' with a class that never occurs: the validator fails, the
    run stops there, and summary.json says which component failed and why."""
    config = _write_config(tiny_data, tmp_path)
    overrides = ["classes=[background, circle, rectangle, triangle, hexagon]", "validation.on_anomaly=fail"]
    assert main(["validate", str(config), "-o", str(tmp_path / "run"), *[arg for o in overrides for arg in ("--set", o)]]) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    validator = summary["components"]["example_validator"]
    assert validator["status"] == "failed" and "hexagon" in validator["error"]
    assert summary["components"]["example_gen"]["status"] == "succeeded"


def test_console_keeps_segflow_lines_and_draws_progress_records() -> None:
    """The default console: segflow's lines (kfp.local indents relayed ones) and kfp.local's
    errors; executor dumps, TensorFlow's noise and kfp's banners only in the transcript."""
    import io

    from segflow.pipelines.local import _Console

    sink, transcript = io.StringIO(), io.StringIO()
    stream = _Console(sink, transcript)
    relayed = (
        "12:00:00.000 - INFO - Executing task 'trainer'\n"
        "    [KFP Executor 2026 INFO]: Got executor_input:\n    {\n        \"inputs\": {}\n    }\n"
        "    I0000 00:00:1 port.cc:153] oneDNN custom operations are on.\n"
        "    [segflow] trainer: started\n    Epoch 1/2\n"
        '    [segflow:progress] {"step": "trainer: x", "total": 2, "unit": "images"}\n'
        '    [segflow:progress] {"step": "trainer: x", "add": 2}\n'
        '    [segflow:progress] {"step": "trainer: x", "end": true}\n'
        "12:00:01.000 - ERROR - Task 'trainer' finished with status FAILURE\n"
    )
    stream.write(relayed)
    lines = sink.getvalue().splitlines()
    assert lines[0] == "[segflow] trainer: started"
    assert lines[1].startswith("[segflow] trainer: x: 2/2 images in ")
    assert lines[2] == "12:00:01.000 - ERROR - Task 'trainer' finished with status FAILURE"
    assert len(lines) == 3
    assert transcript.getvalue() == relayed

    verbose = io.StringIO()
    _Console(verbose, io.StringIO(), verbose=True).write(relayed)
    assert "Got executor_input:" in verbose.getvalue() and "Executing task" in verbose.getvalue()
    assert "[segflow:progress]" not in verbose.getvalue()  # records are drawn, never shown raw


@pytest.mark.parametrize("kind", ["train", "validate"])
def test_summary_component_list_matches_the_dag(kind: str, tmp_path: Path) -> None:
    """summary.json lists components from COMPONENTS; it must name every task of the DAG."""
    from segflow.pipelines.local import COMPONENTS

    path = compile_pipeline(load_config(HERE / "fixtures" / "golden.yaml"), tmp_path / "p.yaml", kind=kind)
    tasks = _dag_tasks(yaml.safe_load(path.read_text()))
    assert sorted(COMPONENTS[kind]) == sorted(task.replace("-", "_") for task in tasks)


def test_tasks_that_read_the_registrys_current_version_are_never_cached(tmp_path: Path) -> None:
    """A warm-starting trainer and a validator comparing with current's statistics depend on
    the registry as it is now, which is no input of theirs: KFP must not replay them."""
    plain = _dag_tasks(_compiled(tmp_path))
    assert plain["trainer"]["cachingOptions"] == plain["example-validator"]["cachingOptions"] == {"enableCache": True}
    current = _dag_tasks(_compiled(tmp_path, "stages.0.initial_weights=current", "validation.baseline_statistics=current"))
    assert current["trainer"]["cachingOptions"] == current["example-validator"]["cachingOptions"] == {}
    assert current["transform"]["cachingOptions"] == {"enableCache": True}
