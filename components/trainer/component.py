"""KFP wrapper of Trainer."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.kfp_base import component


@component
def trainer(
    config_json: str, examples: Input[Dataset], transform_graph: Input[Artifact], model: Output[Model], model_run: Output[Artifact]
) -> None:
    """Keras training; the served model embeds the TFT graph."""
    import os

    from segflow.components.trainer import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute(
        "trainer", os.path.dirname(model.path), core.run, ExperimentConfig.from_json(config_json), examples.path, transform_graph.path, model.path, model_run.path
    )
