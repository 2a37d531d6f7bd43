"""KFP wrapper of Evaluator."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.kfp_base import component


@component
def evaluator(config_json: str, examples: Input[Dataset], model: Input[Model], evaluation: Output[Artifact], blessing: Output[Artifact]) -> None:
    """Per-class IoU/precision/recall on the eval split and the BLESSED marker."""
    import os

    from segflow.components.evaluator import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("evaluator", os.path.dirname(evaluation.path), core.run, ExperimentConfig.from_json(config_json), examples.path, model.path, evaluation.path, blessing.path)
