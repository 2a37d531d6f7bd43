"""KFP wrapper of StatisticsGen."""
from kfp.dsl import Artifact, Dataset, Input, Output

from segflow.kfp_base import component


@component
def statistics_gen(config_json: str, examples: Input[Dataset], statistics: Output[Artifact]) -> None:
    """Per-split dataset statistics (JSON and DatasetFeatureStatisticsList)."""
    import os

    from segflow.components.statistics_gen import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("statistics_gen", os.path.dirname(statistics.path), core.run, ExperimentConfig.from_json(config_json), examples.path, statistics.path)
