"""KFP wrapper of Transform."""
from kfp.dsl import Artifact, Dataset, Input, Output

from segflow.cluster.kfp_base import component


@component
def transform(config_slice: str, examples: Input[Dataset], schema: Input[Artifact], transform_graph: Output[Artifact]) -> None:
    """TFT normalisation graph analysed over the train split."""
    from segflow.config.component_config import run_core

    run_core("transform", config_slice, examples.path, schema.path, transform_graph.path)
