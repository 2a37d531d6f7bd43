"""segflow.utils.storage on local paths, and on a real S3-compatible server (moto in server mode):
ExampleGen reading a dataset from s3://, the Pusher publishing to s3://, `localized`."""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from segflow.utils import storage
from segflow.config.experiment import validate_config
from segflow.data.demo_data import write_demo_dataset
from tests.conftest import pusher_inputs, tiny_raw_config

BUCKET = "segflow-test"


def _tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_join_is_uri_is_local() -> None:
    assert storage.join("s3://bucket", "a", "b.png") == "s3://bucket/a/b.png"
    assert storage.join("s3://bucket/root/", "/a/", "b") == "s3://bucket/root/a/b"
    assert storage.join("gs://bucket/x") == "gs://bucket/x"
    assert storage.join("/data/root", "a", "b.png") == os.path.join("/data/root", "a", "b.png")
    assert storage.join("relative", "a") == os.path.join("relative", "a")
    assert storage.is_uri("gs://b/x") and storage.is_uri("s3://b") and storage.is_uri("file:///tmp")
    assert not storage.is_uri("/tmp/x") and not storage.is_uri("data/images") and not storage.is_uri("C:/data")
    assert storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x") and not storage.is_local("s3://b/x")
    assert storage.basename("s3://bucket/a/b.png") == "b.png" and storage.basename("s3://bucket/a/") == "a"
    assert storage.absolute("s3://bucket/a", "/base") == "s3://bucket/a"
    assert storage.absolute("a/b", "/base") == "/base/a/b"


def test_list_folder_local_includes_dotfiles_and_subfolders(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"12345")
    (tmp_path / "a.png").write_bytes(b"1")
    (tmp_path / ".DS_Store").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.png").write_bytes(b"x")
    listing = storage.list_folder(tmp_path)
    assert [entry.name for entry in listing] == [".DS_Store", "a.png", "b.png", "sub"]
    by_name = {entry.name: entry for entry in listing}
    assert by_name["b.png"].size == 5 and not by_name["b.png"].is_dir
    assert by_name["b.png"].location == str(tmp_path / "b.png")
    assert by_name["b.png"].mtime == pytest.approx((tmp_path / "b.png").stat().st_mtime)
    assert by_name["sub"].is_dir
    with pytest.raises(FileNotFoundError, match="nope: not a folder"):
        storage.list_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="a.png: not a folder"):
        storage.list_folder(tmp_path / "a.png")


def test_read_write_bytes_local(tmp_path: Path) -> None:
    target = str(tmp_path / "new" / "file.bin")
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert storage.read_bytes(target) == b"two" and storage.exists(target)
    assert os.listdir(tmp_path / "new") == ["file.bin"]  # no temporary file left behind
    with pytest.raises(FileExistsError, match="file.bin: already exists"):
        storage.write_bytes(target, b"three", exclusive=True)
    assert storage.read_bytes(target) == b"two" and os.listdir(tmp_path / "new") == ["file.bin"]
    with pytest.raises(FileNotFoundError, match="missing.bin: not found"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with storage.localized(str(tmp_path / "new")) as local:
        assert local == str(tmp_path / "new")
    assert (tmp_path / "new").is_dir()  # a local location is used in place, never removed


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on a free local port, the standard AWS_* variables pointing at it
    (for this module only), and a bucket; yields a fresh `s3://` prefix root."""
    try:
        import boto3
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        pytest.skip(f"moto[server]/boto3/s3fs not installed: {error}")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
    except Exception as error:  # noqa: BLE001 - any failure to bind or start means: no server here
        print(f"moto server could not start: {error!r}")
        pytest.skip(f"moto server could not start: {error!r}")
    host, port = server.get_host_and_port()
    patch = pytest.MonkeyPatch()
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        patch.delenv(name)
    patch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    patch.setenv("AWS_ACCESS_KEY_ID", "testing")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client may point at another endpoint
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        patch.undo()
        server.stop()


@pytest.fixture
def s3_root(s3: str) -> str:
    """A prefix of its own for each test."""
    return storage.join(s3, uuid.uuid4().hex[:12])


def test_s3_list_read_write(s3_root: str) -> None:
    storage.write_bytes(storage.join(s3_root, "d", "b.txt"), b"hello")
    storage.write_bytes(storage.join(s3_root, "d", ".hidden"), b"")
    storage.write_bytes(storage.join(s3_root, "d", "sub", "c.txt"), b"x")
    listing = storage.list_folder(storage.join(s3_root, "d"))
    assert [(entry.name, entry.is_dir) for entry in listing] == [(".hidden", False), ("b.txt", False), ("sub", True)]
    assert listing[1].location == f"{s3_root}/d/b.txt" and listing[1].size == 5 and listing[1].mtime is not None
    assert storage.read_bytes(listing[1].location) == b"hello"
    assert storage.exists(listing[1].location) and not storage.exists(storage.join(s3_root, "d", "nope"))
    with pytest.raises(FileExistsError, match="b.txt: already exists"):
        storage.write_bytes(listing[1].location, b"again", exclusive=True)
    with pytest.raises(FileNotFoundError, match=f"{s3_root}/d/nope: not found"):
        storage.read_bytes(storage.join(s3_root, "d", "nope"))
    with pytest.raises(FileNotFoundError, match=f"{s3_root}/nope: not a folder"):
        storage.list_folder(storage.join(s3_root, "nope"))


def test_localized_s3_folder_is_a_temporary_local_copy(s3_root: str, tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "variables").mkdir(parents=True)
    (source / "saved_model.pb").write_bytes(b"graph")
    (source / "variables" / "variables.index").write_bytes(b"index")
    (source / ".hidden").write_bytes(b"h")
    assert storage.upload_folder(source, storage.join(s3_root, "model")) == [".hidden", "saved_model.pb", "variables/variables.index"]
    with storage.localized(storage.join(s3_root, "model")) as local:
        assert not storage.is_uri(local) and Path(local).name == "model"
        assert _tree(Path(local)) == _tree(source)
    assert not os.path.exists(local)
    with storage.localized(storage.join(s3_root, "model", "saved_model.pb")) as single:
        assert Path(single).read_bytes() == b"graph"
    with pytest.raises(FileNotFoundError, match="nope: not found"):
        with storage.localized(storage.join(s3_root, "nope")):
            pass


def _demo_dataset_in_s3(s3_root: str, data: Path) -> dict[str, object]:
    """Upload the local demo dataset `data` to `<s3_root>/data/`; the `dataset` config key for it."""
    for role in ("images", "masks"):
        storage.upload_folder(data / role, storage.join(s3_root, "data", role))
    return {"images": storage.join(s3_root, "data", "images"), "masks": storage.join(s3_root, "data", "masks"), "eval_split": 0.25}


def test_example_gen_reads_a_dataset_from_s3(s3_root: str, tmp_path: Path) -> None:
    from segflow.components.example_gen import core as example_gen

    data = write_demo_dataset(tmp_path / "data", count=12, size=32)
    (data / "images" / ".DS_Store").write_bytes(b"junk")  # skipped, locally and on S3 alike
    (data / "masks" / "notes").mkdir()
    (data / "masks" / "notes" / "readme.txt").write_text("a subfolder is not read")
    remote_dataset = _demo_dataset_in_s3(s3_root, data)
    local = example_gen.run(validate_config(tiny_raw_config(data)), tmp_path / "local")
    remote = example_gen.run(validate_config(tiny_raw_config(data, dataset=remote_dataset)), tmp_path / "remote")
    assert local["examples_written"] == 12 and local["quarantined"] == 0
    assert remote == local


def test_trainer_reads_its_inputs_from_s3(s3_root: str, trained: dict, tmp_path: Path) -> None:
    """Examples and the transform graph in a bucket: the trainer copies them down and trains."""
    from segflow.components.trainer import core as trainer
    from segflow.export.serving import SERVING_SUBDIR

    examples = storage.join(s3_root, "examples")
    transform = storage.join(s3_root, "transform")
    storage.upload_folder(trained["examples"], examples)
    storage.upload_folder(trained["transform"], transform)
    final = trainer.run(trained["config"], examples, transform, tmp_path / "model", tmp_path / "model_run")
    assert "val_mean_iou" in final and (tmp_path / "model" / SERVING_SUBDIR / "saved_model.pb").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pusher_versions_and_uncommitted_folders(where: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from segflow.export.exporters import EXPORTS_FILE
    from segflow.components.pusher import core as pusher
    from segflow.export import model_registry
    from segflow.utils.io import write_json

    registry = storage.join(request.getfixturevalue("s3_root"), "registry") if where == "s3" else str(tmp_path / "registry")
    config = validate_config(tiny_raw_config(tmp_path, push={"registry": registry}))
    exports = tmp_path / "exports"
    (exports / "saved_model").mkdir(parents=True)
    (exports / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    (exports / "model_int8.tflite").write_bytes(b"tflite")
    for sidecar in ("saved_model.json", "model_int8.tflite.json"):
        (exports / sidecar).write_text("{}")
    passed = {
        "saved_model": {"file": "saved_model", "sidecar": "saved_model.json", "status": "passed"},
        "tflite_int8": {"file": "model_int8.tflite", "sidecar": "model_int8.tflite.json", "status": "passed"},
    }
    write_json(exports / EXPORTS_FILE, passed)  # as the Exporter writes it: the Pusher publishes what passed its gate
    assert model_registry.read_versions(registry, "tiny") == [] and model_registry.next_version(registry, "tiny") == 1

    first = pusher.run(config, exports, push_dir=tmp_path / "push1", **pusher_inputs(tmp_path / "inputs1"))
    second = pusher.run(config, exports, push_dir=tmp_path / "push2", **pusher_inputs(tmp_path / "inputs2"))
    assert (first["version"], second["version"]) == (1, 2)
    assert second["destination"] == storage.join(registry, "tiny", "2")
    assert json.loads((tmp_path / "push2" / pusher.PUSH_FILE).read_text()) == second
    assert model_registry.read_versions(registry, "tiny") == [1, 2]
    with storage.localized(second["destination"]) as version:
        published = _tree(Path(version))
    commit = json.loads(published.pop(model_registry.COMMIT_FILE))
    lineage = json.loads(published.pop(model_registry.LINEAGE_FILE))
    assert (lineage["config_hash"], lineage["dataset_fingerprint"], lineage["counts"]) == ("c" * 64, "d" * 64, {"train": 6, "eval": 2})
    published.pop(model_registry.CLAIM_FILE, None)  # object stores: the claim of the version number
    assert published.pop("network/network.weights.h5") == b"weights" and "network/network.json" in published  # what warm starts load
    published.pop("network/network.json")
    assert json.loads(published.pop("statistics.json")) == {"train": {"class_frequency": [1.0]}}  # what drift checks compare with
    assert published == _tree(exports)
    assert (commit["name"], commit["version"], commit["files"]) == ("tiny", 2, ["exports.json", "lineage.json", "model_int8.tflite", "model_int8.tflite.json", "network/network.json", "network/network.weights.h5", "saved_model.json", "saved_model/saved_model.pb", "statistics.json"])

    # A push that stopped half-way: part of the payload, no commit marker.
    storage.write_bytes(storage.join(registry, "tiny", "3", "model_int8.tflite"), b"partial")
    assert model_registry.read_versions(registry, "tiny") == [1, 2]
    third = pusher.run(config, exports, push_dir=tmp_path / "push3", **pusher_inputs(tmp_path / "inputs3"))
    assert third["version"] == 4  # the interrupted number is skipped, never reused
    assert model_registry.read_versions(registry, "tiny") == [1, 2, 4]


@pytest.mark.extended  # a DAG run through the CLI beyond the default suite's one full run
def test_segflow_validate_on_a_dataset_in_s3(s3_root: str, tmp_path: Path) -> None:
    """Through the CLI and kfp.local: the URIs reach the components unchanged (no pathlib on
    the way) and the components' subprocesses find the server through the AWS_* variables."""
    import yaml

    from segflow.cli import main

    data = write_demo_dataset(tmp_path / "data", count=12, size=32)
    remote_dataset = _demo_dataset_in_s3(s3_root, data)
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(tiny_raw_config(data, dataset=remote_dataset)))
    assert main(["validate", str(config), "-o", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["dataset"]["images"] == remote_dataset["images"]
    assert summary["status"] == "succeeded", summary
    assert summary["counts"]["examples_written"] == 12


def test_relocate_summary_names_the_uploaded_files(tmp_path: Path) -> None:
    """Paths below the local run folder become URIs below the uploaded one; others stay."""
    from segflow.pipelines.local import relocate_summary

    local = tmp_path / "segflow-run-abc"
    summary = {
        "status": "succeeded",
        "counts": {"examples_in": 3},
        "quarantine": str(local / "example_gen" / "examples" / "quarantine.jsonl"),
        "exports": {
            "saved_model": {"path": str(local / "exporter" / "exports" / "saved_model"), "bytes": 10},
            "tflite_int8": {"path": str(local / "exporter" / "exports" / "model_int8.tflite"), "bytes": 5},
        },
        "push": {"pushed": True, "destination": str(tmp_path / "registry" / "tiny" / "1")},
    }
    before = json.loads(json.dumps(summary))
    run = "s3://bucket/runs/x"
    relocated = relocate_summary(summary, local, run)
    assert summary == before  # a copy; the caller's summary is unchanged
    assert relocated["quarantine"] == f"{run}/example_gen/examples/quarantine.jsonl"
    assert {name: entry["path"] for name, entry in relocated["exports"].items()} == {
        "saved_model": f"{run}/exporter/exports/saved_model",
        "tflite_int8": f"{run}/exporter/exports/model_int8.tflite",
    }
    assert relocated["exports"]["saved_model"]["bytes"] == 10 and relocated["counts"] == summary["counts"]
    assert relocated["push"] == summary["push"]  # a local registry outside the run folder keeps its path
    for destination, expected in (
        ("gs://registry/tiny/1", "gs://registry/tiny/1"),
        (str(local / "registry" / "tiny" / "1"), f"{run}/registry/tiny/1"),
        (str(tmp_path / "segflow-run-abc2" / "tiny"), str(tmp_path / "segflow-run-abc2" / "tiny")),  # a sibling, not below
    ):
        assert relocate_summary({"push": {"destination": destination}}, local, run)["push"]["destination"] == expected
    assert relocate_summary({"status": "failed"}, local, run) == {"status": "failed"}


@pytest.mark.extended  # a DAG run through the CLI beyond the default suite's one full run
def test_segflow_validate_uploads_its_run_folder_to_s3(
    s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--output s3://...`: the run happens in a local temporary folder, which is uploaded
    (summary.json last, its paths rewritten to URIs) and removed; a second run there is refused."""
    import tempfile

    import yaml

    from segflow.cli import main

    data = write_demo_dataset(tmp_path / "data", count=12, size=32)
    (data / "masks" / "003.png").unlink()  # one quarantined example, so the quarantine file has a line
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(tiny_raw_config(data)))
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    run = storage.join(s3_root, "runs", "first")
    upload_folder = storage.upload_folder
    uploads = []

    def upload_before_the_summary(local_dir: str, location: str) -> list[str]:
        assert not storage.exists(storage.join(location, "summary.json")) and not os.path.exists(os.path.join(local_dir, "summary.json"))
        uploads.append(location)
        return upload_folder(local_dir, location)

    monkeypatch.setattr(storage, "upload_folder", upload_before_the_summary)
    assert main(["validate", str(config), "-o", run]) == 0
    assert uploads == [run] and f"run folder: {run}\n" in capsys.readouterr().out
    summary = json.loads(storage.read_bytes(storage.join(run, "summary.json")))
    assert summary["status"] == "succeeded", summary
    assert summary["counts"]["examples_written"] == 11 and summary["counts"]["quarantined"] == 1
    assert summary["quarantine"] == storage.join(run, "example_gen", "examples", "quarantine.jsonl")
    quarantined = [json.loads(line) for line in storage.read_bytes(summary["quarantine"]).decode().splitlines()]
    assert [storage.basename(entry["file"]) for entry in quarantined] == ["003.png"]
    components = ["dataset_fingerprint", "example_gen", "statistics_gen", "schema_gen", "example_validator"]
    assert {entry.name for entry in storage.list_folder(run)} == {"config.yaml", "summary.json", "tracking.json", "log.txt", *components}
    assert storage.exists(storage.join(run, "example_validator", "anomalies", "anomalies.json"))
    assert os.listdir(scratch) == [] and os.listdir(cwd) == []  # no temporary run folder left, nothing written here

    assert main(["validate", str(config), "-o", run]) == 2
    assert f"{run}: run folder already has a summary.json" in capsys.readouterr().err
    assert uploads == [run]
