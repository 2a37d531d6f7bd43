"""KFP wrapper of Transform."""
from kfp.dsl import Artifact, Dataset, Input, Output

from segflow.kfp_base import component


@component
def transform(config_json: str, examples: Input[Dataset], schema: Input[Artifact], transform_graph: Output[Artifact]) -> None:
    """TFT normalisation graph analysed over the train split."""
    import os

    from segflow.components.transform import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("transform", os.path.dirname(transform_graph.path), core.run, ExperimentConfig.from_json(config_json), examples.path, transform_graph.path)
