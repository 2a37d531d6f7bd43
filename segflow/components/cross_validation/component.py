"""KFP wrapper of CrossValidation: the evaluations and models of a k-fold run's trainers,
collected from the ParallelFor (`dsl.Collected`), in fold order."""
from typing import List

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.cluster.kfp_base import component


@component
def cross_validation(
    config_slice: str, examples: Input[Dataset], models: Input[List[Model]], evaluations: Input[List[Artifact]], evaluation: Output[Artifact]
) -> None:
    """Per-fold and pooled out-of-fold metrics; the ensemble (mean of probabilities) on the test split."""
    from segflow.config.component_config import run_core

    run_core("cross_validation", config_slice, examples.path, [model.path for model in models], [item.path for item in evaluations], evaluation.path)
