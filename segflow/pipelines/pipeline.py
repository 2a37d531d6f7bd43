"""The segflow DAG as KFP pipelines: the full training pipeline and the validation-only one.

A pipeline is built for one experiment config. Each task gets, as a constant, the slice of
the config its core reads (segflow.config.component_config), so its KFP cache key changes only
with those keys. The dataset folders and the model registry are pipeline parameters
(`images`, `masks`, `registry`; the config's values are their defaults), so one compiled
pipeline serves many datasets. DatasetFingerprint runs uncached before ExampleGen and
passes it the fingerprint of the folders' listing: added or changed files re-run ExampleGen
and everything after it instead of replaying cached examples. (No `from __future__ import
annotations` here: KFP reads the pipeline signature's real types.)
"""

import os
from pathlib import Path
from typing import Any, Callable

from kfp import compiler, dsl

from segflow.cluster.kfp_base import (
    check_kubernetes,
    configure_task,
    local_only_warnings,
)
from segflow.components.cross_validation.component import cross_validation
from segflow.components.dataset_fingerprint.component import dataset_fingerprint
from segflow.components.evaluator.component import evaluator
from segflow.components.example_gen.component import example_gen
from segflow.components.example_validator.component import example_validator
from segflow.components.exporter.component import exporter
from segflow.components.pusher.component import pusher
from segflow.components.retrain_gate.component import retrain_gate
from segflow.components.schema_gen.component import schema_gen
from segflow.components.statistics_gen.component import statistics_gen
from segflow.components.trainer.component import trainer
from segflow.components.transform.component import transform
from segflow.config.component_config import (
    COMPONENT_KEYS,
    DATASET_PARAMETERS,
    LOCATION_PARAMETERS,
    REGISTRY_CURRENT,
    config_slice,
    location_arguments,
    locations,
    resolve_locations,
)
from segflow.config.experiment import ExperimentConfig
from segflow.utils.errors import ConfigError
from segflow.utils.storage import is_uri

# The pipeline parameters of each kind of pipeline.
PARAMETERS = {"train": (*DATASET_PARAMETERS, "registry"), "validate": (*DATASET_PARAMETERS, "registry")}


def build_pipeline(config: ExperimentConfig, kind: str = "train", pipeline_root: str | None = None, cluster: bool = False) -> Callable[..., Any]:
    """The `@dsl.pipeline` of `kind` ('train' or 'validate') for this config: call it under
    kfp.local to run it, or give it to the KFP compiler. `pipeline_root`: the compiled
    pipeline's default root for its artifacts (None: the cluster's default). Every task runs
    the config's image; `cluster` also compiles the `kubernetes` section's node pools,
    resources, retries, Secret env vars and PVC into the pipeline (segflow.cluster.kfp_base)."""
    # One piece on purpose (about 100 lines): the @dsl.pipeline functions close over `step`, `slices`
    # and `defaults`, and KFP reads their own signatures as the pipeline's parameters.
    check_kubernetes(config)
    slices = {name: config_slice(config, name) for name in COMPONENT_KEYS}
    defaults = location_arguments(config, PARAMETERS[kind])

    def step(component: Any, **arguments: Any) -> dsl.PipelineTask:
        return configure_task(component(**arguments), component.name.replace("-", "_"), config, cluster)

    def data_checks(folders: dict[str, str], fingerprint: dsl.PipelineTask, registry: str) -> tuple[dsl.PipelineTask, ...]:
        examples = step(example_gen, config_slice=slices["example_gen"], **folders, dataset_fingerprint=fingerprint.outputs["Output"])
        statistics = step(statistics_gen, config_slice=slices["statistics_gen"], examples=examples.outputs["examples"])
        schema = step(schema_gen, config_slice=slices["schema_gen"], statistics=statistics.outputs["statistics"])
        validation = step(
            example_validator, config_slice=slices["example_validator"], registry=registry, statistics=statistics.outputs["statistics"], schema=schema.outputs["schema"],
        )
        return examples, statistics, schema, validation

    if kind == "validate":

        @dsl.pipeline(name="segflow-validate", description="segflow: ExampleGen, statistics, schema and data validation only", pipeline_root=pipeline_root)
        def validation_pipeline(
            images: str = defaults["images"],
            masks: str = defaults["masks"],
            eval_images: str = defaults["eval_images"],
            eval_masks: str = defaults["eval_masks"],
            test_images: str = defaults["test_images"],
            test_masks: str = defaults["test_masks"],
            registry: str = defaults["registry"],
        ) -> None:
            folders = dict(images=images, masks=masks, eval_images=eval_images, eval_masks=eval_masks, test_images=test_images, test_masks=test_masks)
            data_checks(folders, step(dataset_fingerprint, **folders), registry)

        return validation_pipeline

    def train_and_push(folders: dict[str, str], fingerprint: dsl.PipelineTask, registry: str) -> None:
        examples, statistics, schema, validation = data_checks(folders, fingerprint, registry)
        page_inputs = {"statistics": statistics.outputs["statistics"], "anomalies": validation.outputs["anomalies"]}  # the evaluator's report page
        graph = step(transform, config_slice=slices["transform"], examples=examples.outputs["examples"], schema=schema.outputs["schema"])
        if config.dataset.folds is not None:
            # One trainer and evaluator per fold; locally one at a time (2 cores), on a cluster all at once.
            with dsl.ParallelFor(items=config.dataset.trained_folds(), parallelism=None if cluster else 1) as fold:
                model = step(
                    trainer, config_slice=slices["trainer"], registry=registry, examples=examples.outputs["examples"], transform_graph=graph.outputs["transform_graph"], fold=fold,
                )
                model.after(validation)
                evaluation = step(
                    evaluator, config_slice=slices["evaluator"], registry=registry, examples=examples.outputs["examples"], model=model.outputs["model"],
                    model_run=model.outputs["model_run"], fold=fold, **page_inputs,
                )
            step(
                cross_validation, config_slice=slices["cross_validation"], examples=examples.outputs["examples"],
                models=dsl.Collected(model.outputs["model"]), evaluations=dsl.Collected(evaluation.outputs["evaluation"]),
            )
            return  # a k-fold run measures a config; the model to export and push comes from a run without folds
        model = step(trainer, config_slice=slices["trainer"], registry=registry, examples=examples.outputs["examples"], transform_graph=graph.outputs["transform_graph"])
        model.after(validation)  # with on_anomaly 'fail', bad data stops the run before training
        evaluation = step(
            evaluator, config_slice=slices["evaluator"], registry=registry, examples=examples.outputs["examples"], model=model.outputs["model"],
            model_run=model.outputs["model_run"], **page_inputs,
        )
        # A model that is not blessed (value thresholds, or worse than the registry's current version) is neither exported nor pushed.
        with dsl.If(evaluation.outputs["Output"] == True, name="blessed"):  # noqa: E712  (a KFP condition, not a Python comparison)
            exports = step(exporter, config_slice=slices["exporter"], examples=examples.outputs["examples"], model=model.outputs["model"])
            step(
                pusher, config_slice=slices["pusher"], registry=registry, config_hash=config_hash, dataset_fingerprint=fingerprint.outputs["Output"],
                exports=exports.outputs["exports"], model=model.outputs["model"], statistics=statistics.outputs["statistics"], blessing=evaluation.outputs["blessing"], examples=examples.outputs["examples"],
                evaluation=evaluation.outputs["evaluation"],
            )

    config_hash = config.config_hash()

    @dsl.pipeline(name="segflow", description="segflow: ExampleGen to Pusher for image segmentation", pipeline_root=pipeline_root)
    def training_pipeline(
        images: str = defaults["images"],
        masks: str = defaults["masks"],
        eval_images: str = defaults["eval_images"],
        eval_masks: str = defaults["eval_masks"],
        test_images: str = defaults["test_images"],
        test_masks: str = defaults["test_masks"],
        registry: str = defaults["registry"],
        force: bool = False,
    ) -> None:
        folders = dict(images=images, masks=masks, eval_images=eval_images, eval_masks=eval_masks, test_images=test_images, test_masks=test_masks)
        fingerprint = step(dataset_fingerprint, **folders)
        if config.dataset.folds is not None:  # a k-fold run measures; it never pushes, so there is no version to compare with
            train_and_push(folders, fingerprint, registry)
            return
        # Nothing new since the version that serves (same data, same config): skip the rest, unless `force`.
        gate = step(
            retrain_gate, config_slice=slices["retrain_gate"], registry=registry, config_hash=config_hash, dataset_fingerprint=fingerprint.outputs["Output"], force=force,
        )
        with dsl.If(gate.outputs["Output"] == True, name="something-new"):  # noqa: E712  (a KFP condition)
            train_and_push(folders, fingerprint, registry)

    return training_pipeline


def check_locations(config: ExperimentConfig, kind: str) -> None:
    """ConfigError naming every location the compiled pipeline would embed as a relative path:
    it would be resolved in the pods' working directory, not where `segflow compile` ran."""
    unused = {LOCATION_PARAMETERS[name] for name in LOCATION_PARAMETERS if name not in PARAMETERS[kind]}
    if kind == "validate" and config.validation.baseline_statistics != REGISTRY_CURRENT:
        unused.add(LOCATION_PARAMETERS["registry"])  # the validate pipeline reads the registry only for that
    relative = {key: value for key, value in locations(config).items() if key not in unused and not _reachable_from_pods(value)}
    if relative:
        named = ", ".join(f"{key} {value!r}" for key, value in relative.items())
        raise ConfigError(
            f"relative path in a compiled pipeline: {named}. The pipeline runs in the cluster's pods, not in this directory: "
            "give an absolute path (mounted at that path in the pods) or a gs:// / s3:// URI reachable from the cluster's pods, "
            "or pass --resolve-paths to make relative paths absolute against the current directory"
        )


def _reachable_from_pods(location: str) -> bool:
    return is_uri(location) or os.path.isabs(location)


def check_pipeline_root(pipeline_root: str | None, source: str = "--pipeline-root") -> None:
    """ConfigError for a relative pipeline root (`source` names where it came from): KFP
    would write the artifacts relative to the pods' working directory."""
    if pipeline_root is not None and not _reachable_from_pods(pipeline_root):
        raise ConfigError(
            f"relative {source} {pipeline_root!r}: the pipeline's artifacts are written from the cluster's pods, "
            "so give a gs:// / s3:// URI (or minio://) or an absolute path (mounted at that path in the pods)"
        )


def compile_pipeline(
    config: ExperimentConfig, output: str | Path, kind: str = "train", resolve_paths: bool = False, pipeline_root: str | None = None
) -> Path:
    """KFP v2 IR YAML of the `kind` pipeline for this config, with the `kubernetes` section
    compiled in; relative locations are an error unless `resolve_paths` makes them absolute
    against the working directory. The pipeline's `defaultPipelineRoot` is `pipeline_root`
    (a URI or an absolute path; the --pipeline-root flag) or else kubernetes.pipeline_root."""
    if resolve_paths:
        config = resolve_locations(config)
    check_locations(config, kind)
    check_pipeline_root(pipeline_root)
    check_pipeline_root(config.kubernetes.pipeline_root, "kubernetes.pipeline_root")
    root = pipeline_root if pipeline_root is not None else config.kubernetes.pipeline_root
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(config, kind, root, cluster=True), str(output), pipeline_name=f"segflow-{config.name}")
    return output


def parity_warnings(config: ExperimentConfig, local_run: bool = False) -> list[str]:
    """One line per `kubernetes` key that the compiled pipeline applies on the cluster and a
    local run (`segflow run`, kfp.local) does not, naming the key; `local_run` words it for
    the run that ignores it."""
    if local_run:
        return [f"{key} is ignored by this local run (kfp.local); on the cluster: {effect}" for key, effect in local_only_warnings(config)]
    return [f"{key}: {effect} on the cluster; kfp.local (segflow run) ignores it" for key, effect in local_only_warnings(config)]
