"""KFP wrapper of Trainer; `registry` (a pipeline parameter) overrides push.registry."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.cluster.kfp_base import component


@component
def trainer(
    config_slice: str, registry: str, examples: Input[Dataset], transform_graph: Input[Artifact], model: Output[Model], model_run: Output[Artifact], fold: int = -1
) -> None:
    """Keras training; the served model embeds the TFT graph. `fold` >= 0: a k-fold run's trainer
    of that fold. `registry` overrides push.registry (warm starts from its current version)."""
    from segflow.config.component_config import run_core

    run_core("trainer", config_slice, examples.path, transform_graph.path, model.path, model_run.path, fold=fold, registry=registry)
