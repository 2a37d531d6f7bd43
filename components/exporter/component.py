"""KFP wrapper of Exporter."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.kfp_base import component


@component
def exporter(config_json: str, examples: Input[Dataset], model: Input[Model], exports: Output[Artifact]) -> None:
    """SavedModel/TFLite exports, each re-evaluated on the eval split."""
    import os

    from segflow.components.exporter import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("exporter", os.path.dirname(exports.path), core.run, ExperimentConfig.from_json(config_json), examples.path, model.path, exports.path)
