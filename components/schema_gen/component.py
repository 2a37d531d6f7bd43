"""KFP wrapper of SchemaGen."""
from kfp.dsl import Artifact, Input, Output

from segflow.kfp_base import component


@component
def schema_gen(config_json: str, statistics: Input[Artifact], schema: Output[Artifact]) -> None:
    """A tensorflow_metadata schema inferred from the train statistics."""
    import os

    from segflow.components.schema_gen import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("schema_gen", os.path.dirname(schema.path), core.run, ExperimentConfig.from_json(config_json), statistics.path, schema.path)
