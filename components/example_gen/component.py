"""KFP wrapper of ExampleGen: maps the typed output artifact onto `core.run`."""
from kfp.dsl import Dataset, Output

from segflow.kfp_base import component


@component
def example_gen(config_json: str, examples: Output[Dataset]) -> None:
    """Image/mask folders -> Split-train/Split-eval TFRecords and a quarantine report."""
    import os

    from segflow.components.example_gen import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("example_gen", os.path.dirname(examples.path), core.run, ExperimentConfig.from_json(config_json), examples.path)
