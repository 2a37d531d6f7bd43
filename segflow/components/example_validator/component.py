"""KFP wrapper of ExampleValidator."""
from kfp.dsl import Artifact, Input, Output

from segflow.cluster.kfp_base import component


@component
def example_validator(config_slice: str, registry: str, statistics: Input[Artifact], schema: Input[Artifact], anomalies: Output[Artifact]) -> None:
    """Data anomalies; fails the run when validation.on_anomaly (or on_drift) is 'fail'. `registry`
    overrides push.registry (validation.baseline_statistics: current)."""
    from segflow.config.component_config import run_core

    run_core("example_validator", config_slice, statistics.path, schema.path, anomalies.path, registry=registry)
