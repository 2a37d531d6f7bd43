"""KFP wrapper of Evaluator."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.kfp_base import component


@component
def evaluator(
    config_slice: str, examples: Input[Dataset], model: Input[Model], evaluation: Output[Artifact], blessing: Output[Artifact], fold: int = -1
) -> None:
    """Per-class IoU/precision/recall on the eval split (a k-fold run: the fold `fold`) and the BLESSED marker."""
    from segflow.component_config import run_core

    run_core("evaluator", config_slice, examples.path, model.path, evaluation.path, blessing.path, fold=fold)
