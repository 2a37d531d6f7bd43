"""KFP wrapper of ExampleGen: the dataset folders are parameters (they override
dataset.images/masks); `dataset_fingerprint` is not read, it is there for the cache key."""
from kfp.dsl import Dataset, Output

from segflow.kfp_base import component


@component
def example_gen(config_slice: str, images: str, masks: str, dataset_fingerprint: str, examples: Output[Dataset]) -> None:
    """Image/mask folders -> Split-train/Split-eval TFRecords and a quarantine report."""
    from segflow.component_config import run_core

    run_core("example_gen", config_slice, examples.path, images=images, masks=masks)
