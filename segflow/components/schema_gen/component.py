"""KFP wrapper of SchemaGen."""
from kfp.dsl import Artifact, Input, Output

from segflow.cluster.kfp_base import component


@component
def schema_gen(config_slice: str, statistics: Input[Artifact], schema: Output[Artifact]) -> None:
    """A tensorflow_metadata schema inferred from the train statistics."""
    from segflow.config.component_config import run_core

    run_core("schema_gen", config_slice, statistics.path, schema.path)
