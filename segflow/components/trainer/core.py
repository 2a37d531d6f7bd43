"""Trainer: tf_keras segmentation model trained from the Examples and the TFT graph.

This core is the component's orchestration over segflow.train, where the pieces live:
input_pipeline (tf.data streams: decode, resize or crops, cache, shuffle, augmentation,
TFT normalisation), hard_negatives (the crops' error maps and their refresh), network
(building and compiling), stages (the stage loop, its callbacks, resume from `backup/`),
robustness (out of memory, NaN losses, atomic weights files), progress (the per-epoch
console line), qat (the quantization-aware fine-tune), multiworker (weights digests, the
workers' agreement, fault injection) and lr_sweep (`segflow lr-find`'s sweep). It writes the
served model (`Format-Serving/`, TFT graph inside) and a model-run folder with TensorBoard
logs, `history.csv` and checkpoints.

Distribution (`trainer` config section, segflow/train/distribute.py): the model is built and
compiled inside the strategy's scope, the global batch is `batch` x replicas, and the
learning rate optionally scales with the replicas. With `trainer.workers` > 1 this core is
a launcher (segflow/cluster/launcher.py): every worker runs `train_worker` under
MultiWorkerMirroredStrategy; only the chief (worker 0) writes the checkpoints, TensorBoard
logs, history and model, the others write to their scratch folders, which are removed.
`model_run/workers.json` records each worker's final-weights digest (they must agree).

Robustness (segflow/train/robustness.py): a ResourceExhaustedError (out of memory) during a
stage halves the batch and retries the stage from its backup, down to batch 1; a NaN or
infinite loss stops training with `TrainingDiverged`, and the last good weights stay in
`backup/`. `model_run/training.json` records the batch used, the halvings and the epoch a
resumed run started from (summary.json reports it). `trainer.mixed_precision` and
`trainer.jit_compile` are the speed switches; the served model is always a float32 copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras
import yaml

from segflow.cluster.launcher import backend_name, launch
from segflow.cluster.workers import LaunchRequest, worker_scratch
from segflow.config.experiment import ExperimentConfig
from segflow.data.preprocessing import PixelSpec
from segflow.evaluate.analyze import HISTORY_FILE
from segflow.export.serving import QAT_SERVING_SUBDIR, SegmentationServer, ServingSpec
from segflow.model.losses import LabelSpec, resolve_class_weights
from segflow.train.callbacks import write_config_text
from segflow.train.distribute import Plan, make_plan
from segflow.train.hard_negatives import train_error_maps
from segflow.train.input_pipeline import batching
from segflow.train.multiworker import agreed_final, weights_digest
from segflow.train.network import build_network, build_trained_network, compile_network
from segflow.train.qat_fine_tune import fine_tune_qat
from segflow.train.robustness import Batching
from segflow.train.stages import TENSORBOARD_FOLDER, StageRun, completed_epochs, last_epoch, train_stages
from segflow.train.warm_start import NETWORK_FOLDER, resolve_current, write_network
from segflow.utils.io import atomic_dir, write_json
from segflow.utils.runtime import log
from segflow.utils.storage import is_uri, localized

TRAINING_FILE = "training.json"  # in model_run/: batch used, halvings, resumed epoch
BACKUP_FOLDER = "backup"  # beside the trainer's outputs, not inside their temporary folders
AUGMENTATION_FOLDER = "augmentation"  # in model_run/: preview.png and preview.policy.json (segflow.train.preview)
PREVIEW_EXAMPLES = 8
FOLD_EXAMPLES = "fold_examples"  # a k-fold trainer's view of the Examples, beside its outputs while it trains
WORKER_ENTRY = "segflow.components.trainer.core:train_worker"
# `segflow run --resume` points the new run's trainer at the interrupted run's backup/ folder.
RESUME_BACKUP_ENV = "SEGFLOW_RESUME_BACKUP"


def run(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    fold: int | None = None,
) -> dict[str, Any]:
    """Train every stage, then write the served model. `fold` (k-fold runs): train on the
    other folds, validate on this one (a fold view of the Examples, beside
    `model_run_dir` so that every worker can read it; removed at the end). The inputs may be gs:// or s3:// URIs
    (copied to local disk first: tf.data cannot read s3 and the TFT graph wants a folder).
    A crash resumes from `backup/` beside `model_run_dir`: finished stages are skipped, the
    running one continues at its last epoch. With `trainer.workers` > 1 the training runs
    in launched workers (`_launch`) and this process waits for them."""
    if fold is not None:
        from segflow.components.example_gen.core import fold_view
        from segflow.data.examples import read_counts

        with fold_view(examples_dir, fold, Path(model_run_dir).parent / FOLD_EXAMPLES) as view:
            counts = read_counts(view)
            choices = config.validation_choices
            use = f"choosing with {', '.join(choices)} on its {counts['eval_examples']}: its scores saw that choice" if choices else f"validating on its {counts['eval_examples']}"
            log(f"trainer: fold {fold}: training on {counts['train_examples']} examples of the other folds, {use}")
            return run(config, view, transform_dir, model_dir, model_run_dir)
    _adopt_backup(Path(model_run_dir).parent / BACKUP_FOLDER)
    config, parent = resolve_current(config)  # once, before any worker: they all start from the same version
    if config.trainer.workers > 1:
        return _launch(config, examples_dir, transform_dir, model_dir, model_run_dir, parent)
    plan = make_plan(config.trainer.distribution)  # before any TensorFlow op (collectives are configured at startup)
    with localized(examples_dir) as local_examples, localized(transform_dir) as local_transform:
        final, _ = _train(config, plan, local_examples, local_transform, model_dir, model_run_dir, Path(model_run_dir).parent / BACKUP_FOLDER, parent)
    return final


def _adopt_backup(backup: Path) -> None:
    """`segflow run --resume` reruns the DAG in new task folders: move the interrupted run's
    backup (RESUME_BACKUP_ENV) to where this trainer looks, unless it already has one."""
    previous = os.environ.get(RESUME_BACKUP_ENV)
    if not previous or backup.exists() or not Path(previous).is_dir():
        return
    backup.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(previous, backup)
    log(f"trainer: resuming from the interrupted run's backup {previous}")


def _launch(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    parent: int | None,
) -> dict[str, Any]:
    """Run `train_worker` in `trainer.workers` workers (segflow.cluster.launcher) and check they agree.
    Locally the chief writes the outputs in place; on Kubernetes (`_cluster_launch`) through
    the shared volume. Adds `workers.json` (each worker's final-weights digest) to model_run/."""
    if config.trainer.distribution not in ("auto", "multi_worker"):
        raise ValueError(
            f"trainer.workers {config.trainer.workers} trains with MultiWorkerMirroredStrategy: "
            f"trainer.distribution must be auto or multi_worker, not {config.trainer.distribution}"
        )
    backend = backend_name(config.trainer.launcher)
    if backend == "local":
        request = _launch_request(config, examples_dir, transform_dir, model_dir, model_run_dir, Path(model_run_dir).parent, parent=parent)
        try:
            results = launch(request, backend)
        except BaseException:
            _remove_partial_outputs(Path(model_dir), Path(model_run_dir))
            raise
    else:
        results = _cluster_launch(config, backend, examples_dir, transform_dir, model_dir, model_run_dir, parent)
    return agreed_final(results, model_run_dir)


def _launch_request(
    config: ExperimentConfig,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    workdir: Path,
    run_id: str = "",
    parent: int | None = None,
) -> LaunchRequest:
    arguments = {
        "config_json": config.to_json(),
        "examples_dir": str(examples_dir),
        "transform_dir": str(transform_dir),
        "model_dir": str(model_dir),
        "model_run_dir": str(model_run_dir),
        "parent": parent,
    }
    return LaunchRequest(
        name="trainer",
        entry=WORKER_ENTRY,
        arguments=arguments,
        workers=config.trainer.workers,
        timeout_seconds=config.trainer.timeout_seconds,
        workdir=workdir,
        config_json=arguments["config_json"],
        run_id=run_id,
    )


def _cluster_launch(
    config: ExperimentConfig,
    backend: str,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    parent: int | None,
) -> list[dict[str, Any]]:
    """Worker pods cannot see this step's local folders, so the run goes through a staging
    folder on the PVC (`kubernetes.pvc`, mounted in this step and in every worker): local
    inputs are copied there (URIs are read by the workers themselves), the chief writes the
    model and model_run there, and they are copied into this step's outputs afterwards. The
    folder is named after the config and the output path, so a retried step resumes from the
    `backup/` a failed attempt left in it; a successful launch removes it."""
    if not config.kubernetes.pvc:
        raise ValueError(
            f"trainer.workers {config.trainer.workers} with the {backend} launcher needs kubernetes.pvc: the worker pods "
            "read the examples from that shared volume and the chief writes the model to it"
        )
    mount = Path(config.kubernetes.pvc_mount_path)
    run_id = hashlib.sha256(f"{config.to_json()}|{Path(model_dir).resolve()}".encode()).hexdigest()[:10]
    staging = mount / ".segflow-launch" / run_id
    shutil.rmtree(staging / "launch", ignore_errors=True)  # a failed attempt's results

    def shared(location: str | os.PathLike[str], name: str) -> str:
        if is_uri(str(location)) or Path(location).resolve().is_relative_to(mount.resolve()):
            return str(location)
        target = staging / "inputs" / name
        if not target.exists():
            with atomic_dir(target) as copy:
                shutil.copytree(location, copy, dirs_exist_ok=True)
        return str(target)

    staged_model, staged_run = staging / "model", staging / "model_run"
    request = _launch_request(
        config, shared(examples_dir, "examples"), shared(transform_dir, "transform"), staged_model, staged_run, staging / "launch", run_id, parent
    )
    results = launch(request, backend)
    for staged, target in ((staged_model, model_dir), (staged_run, model_run_dir)):
        with atomic_dir(target) as copy:
            shutil.copytree(staged, copy, dirs_exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    for result in results:  # where the chief wrote, as this step's caller sees it
        if result.get("chief"):
            result["wrote"] = str(model_run_dir)
    return results


def _remove_partial_outputs(*targets: Path) -> None:
    """What a killed chief leaves: atomic_dir's temporary siblings (`.<name>.*`) of its outputs
    and a half-written stage weights file; `backup/` itself stays, to resume from."""
    for target in targets:
        for partial in target.parent.glob(f".{target.name}.*"):
            shutil.rmtree(partial, ignore_errors=True)
    backup = targets[0].parent / BACKUP_FOLDER
    for partial in backup.glob(".partial-*"):
        partial.unlink(missing_ok=True)


def train_worker(config_json: str, examples_dir: str, transform_dir: str, model_dir: str, model_run_dir: str, parent: int | None = None) -> dict[str, Any]:
    """One worker of a multi-worker run (called by `python -m segflow.cluster.workers worker`, with
    TF_CONFIG set); `parent`: the registry version its stages start from. The chief writes to `model_dir`, `model_run_dir` and the shared `backup/`
    beside them; another worker writes to its scratch folder and removes what it wrote."""
    config = ExperimentConfig.from_json(config_json)
    plan = make_plan(config.trainer.distribution)  # first: MultiWorkerMirroredStrategy needs a fresh context
    backup = Path(model_run_dir).parent / BACKUP_FOLDER
    private: Path | None = None
    if not plan.chief:
        private = Path(tempfile.mkdtemp(prefix=f"worker-{plan.index}-", dir=worker_scratch()))
        model_dir, model_run_dir = str(private / "model"), str(private / "model_run")
    try:
        with localized(examples_dir) as local_examples, localized(transform_dir) as local_transform:
            final, digest = _train(config, plan, local_examples, local_transform, model_dir, model_run_dir, backup, parent)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    return {
        "index": plan.index,
        "chief": plan.chief,
        "wrote": str(model_run_dir),
        "removed": private is not None,
        "weights_sha256": digest,
        "final": final,
    }


def _preview_augmentation(config: ExperimentConfig, examples_dir: str | os.PathLike[str], output: Path) -> None:
    """The `segflow preview` grid of the first train examples and the resolved policy, in the
    run artifact: what this run's augmentation did, kept with the model it trained."""
    from segflow.data.examples import iter_split
    from segflow.train.preview import PreviewSettings, write_grid

    examples = [(example.filename, example.image, example.mask) for example, _ in zip(iter_split(examples_dir, "train"), range(PREVIEW_EXAMPLES))]
    settings = PreviewSettings(config.augmentation, config.ignore_index, config.shape, config.seed, config.patches)
    written = write_grid(settings, examples, output, PREVIEW_EXAMPLES)
    log(f"trainer: augmentation preview of {written['examples']} train examples in {output.parent.name}/{output.name}")


def trainer_settings(config: ExperimentConfig) -> str:
    """The config keys the trainer reads (its slice; the others are not its to show), as YAML."""
    from segflow.config.component_config import COMPONENT_KEYS

    sections = {key.split(".")[0] for key in COMPONENT_KEYS["trainer"]}
    return yaml.safe_dump({key: value for key, value in json.loads(config.to_json()).items() if key in sections}, sort_keys=False)


def _train(
    config: ExperimentConfig,
    plan: Plan,
    examples_dir: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    model_run_dir: str | os.PathLike[str],
    backup: Path,
    parent: int | None = None,
) -> tuple[dict[str, Any], str]:
    """(final metrics, sha256 of the final weights). `backup` is read by every worker and
    written by the chief; another worker keeps its own stage weights and history beside its
    `model_run_dir` (a scratch folder). `parent`: the registry version the stages start from."""
    from segflow.components.transform.core import transform_layer

    keras.utils.set_random_seed(config.seed)
    _set_op_determinism(config.deterministic)
    class_weights = resolve_class_weights(config.class_weights, examples_dir, config.class_names)
    labels = LabelSpec(config.num_labels, config.sigmoid_head, config.ignore_index, class_weights)
    pixels = PixelSpec.load(transform_dir)
    tft_layer = transform_layer(transform_dir)
    sizes = Batching(batching(config, plan, examples_dir, tft_layer, pixels), config.batch)
    network = build_trained_network(config, plan)
    error_maps = train_error_maps(config, examples_dir)
    log(f"trainer: {config.architecture}/{config.backbone}, {network.count_params():,} parameters, {config.total_epochs} epochs")
    if plan.replicas > 1 or plan.workers > 1:
        log(f"trainer: {plan.describe()}; global batch {sizes.global_batch} ({config.batch} per replica)")
    own_backup = backup if plan.chief else Path(model_run_dir).parent / BACKUP_FOLDER
    backup.mkdir(parents=True, exist_ok=True)
    own_backup.mkdir(parents=True, exist_ok=True)
    resumed = completed_epochs(backup / HISTORY_FILE)  # the chief's history, read by every worker
    if resumed:
        log(f"trainer: {resumed} epochs finished before a restart; training continues at epoch {resumed + 1}")
    with atomic_dir(model_run_dir) as run_out:
        training = StageRun(config, plan, examples_dir, labels, pixels, tft_layer, network, error_maps, sizes, backup, own_backup, run_out)
        final = _write_model_run(training, resumed)
    weights = network.get_weights()  # on every worker: reading synced-on-read variables is a collective
    if plan.chief:
        _write_model(training, weights, model_dir, parent)
        shutil.rmtree(backup)  # the run is complete; nothing left to resume
    else:  # only the chief writes the model; this worker's scratch outputs go
        shutil.rmtree(own_backup, ignore_errors=True)
    log(f"trainer: final loss {final.get('loss', float('nan')):.4f}, validation mean IoU {final.get('val_mean_iou', float('nan')):.4f}")
    return final, weights_digest(weights)


def _write_model_run(training: StageRun, resumed: int) -> dict[str, float]:
    """Train the stages into model_run/ (`training.run_out`), with the resolved config and the
    augmentation preview first and training.json, history.csv and final_metrics.json after;
    returns the final metrics. `resumed`: the epochs finished before a restart."""
    config, run_out, sizes = training.config, training.run_out, training.batching
    write_config_text(run_out / TENSORBOARD_FOLDER, trainer_settings(config))
    if config.augmentation:
        _preview_augmentation(config, training.examples_dir, run_out / AUGMENTATION_FOLDER / "preview.png")
    train_stages(training)
    write_json(
        run_out / TRAINING_FILE,
        {"batch": sizes.batch, "configured_batch": config.batch, "batch_halvings": sizes.halvings, "epochs_before_resume": resumed,
         "mixed_precision": config.trainer.mixed_precision, "jit_compile": config.trainer.jit_compile},
    )
    shutil.copyfile(training.own_backup / HISTORY_FILE, run_out / HISTORY_FILE)
    final = last_epoch(run_out / HISTORY_FILE)  # the run's, also when every stage finished before a restart
    write_json(run_out / "final_metrics.json", final)
    return final


def _write_model(training: StageRun, weights: list[np.ndarray], model_dir: str | os.PathLike[str], parent: int | None) -> None:
    """The chief's served model (`Format-Serving/` with the TFT graph) and its network's weights
    with their recipe (`network/`, what a later run warm-starts from), plus the
    quantization-aware model with `qat`; `weights`: the trained network's final weights."""
    config, plan, labels, pixels, tft_layer = training.config, training.plan, training.labels, training.pixels, training.tft_layer
    served = training.network
    if plan.strategy is not tf.distribute.get_strategy() or config.trainer.mixed_precision:
        # A plain float32 copy outside any strategy: saving it needs no other worker, it loads
        # anywhere, and its exports compute in float32 whatever the training policy was.
        served = build_network(config)
        served.set_weights(weights)
        compile_network(served, config, labels, keras.optimizers.Adam())
    with atomic_dir(model_dir) as model_out:
        write_network(model_out / NETWORK_FOLDER, config, served.save_weights, parent)
        spec = ServingSpec(
            tuple(config.shape), tuple(config.class_names), config.sigmoid_head, config.ignore_index, pixels.input_dtype, pixels.value_max,
            config.patches.resize, config.patches.interpolation,
        )
        SegmentationServer(served, tft_layer, spec).save(model_out)
        if config.qat is not None:
            quantization_aware = fine_tune_qat(config, served, labels, training.examples_dir, tft_layer, pixels, training.batching.validation)
            SegmentationServer(quantization_aware, tft_layer, spec).save(model_out, QAT_SERVING_SUBDIR)


def _set_op_determinism(enabled: bool) -> None:
    """Op determinism is process-wide and TensorFlow only offers to switch it on: a process
    that trains several configs (lr-find, tests) must not carry one run's setting into the
    next, e.g. into XLA, which has no deterministic MaxPool gradient and then fails."""
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()
