"""KFP wrapper of ExampleValidator."""
from kfp.dsl import Artifact, Input, Output

from segflow.kfp_base import component


@component
def example_validator(config_json: str, statistics: Input[Artifact], schema: Input[Artifact], anomalies: Output[Artifact]) -> None:
    """Data anomalies; fails the run when validation.on_anomaly is 'fail'."""
    import os

    from segflow.components.example_validator import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute(
        "example_validator", os.path.dirname(anomalies.path), core.run, ExperimentConfig.from_json(config_json), statistics.path, schema.path, anomalies.path
    )
