"""KFP wrapper of Exporter."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.cluster.kfp_base import component


@component
def exporter(config_slice: str, examples: Input[Dataset], model: Input[Model], exports: Output[Artifact]) -> None:
    """SavedModel/TFLite exports, each re-evaluated on the eval split."""
    from segflow.config.component_config import run_core

    run_core("exporter", config_slice, examples.path, model.path, exports.path)
