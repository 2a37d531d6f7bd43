"""The segflow DAG as KFP pipelines: the full training pipeline and the validation-only one.

The whole experiment config travels as one JSON string parameter, validated by the
same pydantic model inside every component, so a compiled pipeline and a local run
execute exactly the same code on exactly the same settings. (No `from __future__ import
annotations` here: KFP reads the pipeline signature's real types.)
"""

from pathlib import Path

from kfp import compiler, dsl

from segflow.components.evaluator.component import evaluator
from segflow.components.example_gen.component import example_gen
from segflow.components.example_validator.component import example_validator
from segflow.components.exporter.component import exporter
from segflow.components.pusher.component import pusher
from segflow.components.schema_gen.component import schema_gen
from segflow.components.statistics_gen.component import statistics_gen
from segflow.components.trainer.component import trainer
from segflow.components.transform.component import transform
from segflow.config import ExperimentConfig


def _data_checks(config_json: str) -> tuple[dsl.PipelineTask, dsl.PipelineTask, dsl.PipelineTask]:
    examples = example_gen(config_json=config_json)
    statistics = statistics_gen(config_json=config_json, examples=examples.outputs["examples"])
    schema = schema_gen(config_json=config_json, statistics=statistics.outputs["statistics"])
    validation = example_validator(config_json=config_json, statistics=statistics.outputs["statistics"], schema=schema.outputs["schema"])
    return examples, schema, validation


@dsl.pipeline(name="segflow", description="segflow: ExampleGen to Pusher for image segmentation")
def training_pipeline(config_json: str) -> None:
    examples, schema, validation = _data_checks(config_json)
    graph = transform(config_json=config_json, examples=examples.outputs["examples"], schema=schema.outputs["schema"])
    model = trainer(config_json=config_json, examples=examples.outputs["examples"], transform_graph=graph.outputs["transform_graph"])
    model.after(validation)  # with on_anomaly 'fail', bad data stops the run before training
    evaluation = evaluator(config_json=config_json, examples=examples.outputs["examples"], model=model.outputs["model"])
    exports = exporter(config_json=config_json, examples=examples.outputs["examples"], model=model.outputs["model"])
    pusher(config_json=config_json, exports=exports.outputs["exports"], blessing=evaluation.outputs["blessing"])


@dsl.pipeline(name="segflow-validate", description="segflow: ExampleGen, statistics, schema and data validation only")
def validation_pipeline(config_json: str) -> None:
    _data_checks(config_json)


PIPELINES = {"train": training_pipeline, "validate": validation_pipeline}


def compile_pipeline(config: ExperimentConfig, output: str | Path, kind: str = "train") -> Path:
    """KFP v2 IR YAML with the config as the default of its `config_json` parameter."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[kind], str(output), pipeline_name=f"segflow-{config.name}", pipeline_parameters={"config_json": config.to_json()})
    return output
