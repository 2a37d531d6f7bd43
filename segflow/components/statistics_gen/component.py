"""KFP wrapper of StatisticsGen."""
from kfp.dsl import Artifact, Dataset, Input, Output

from segflow.cluster.kfp_base import component


@component
def statistics_gen(config_slice: str, examples: Input[Dataset], statistics: Output[Artifact]) -> None:
    """Per-split dataset statistics (JSON and DatasetFeatureStatisticsList)."""
    from segflow.config.component_config import run_core

    run_core("statistics_gen", config_slice, examples.path, statistics.path)
