"""KFP wrapper of ExampleGen: the dataset folders are parameters (they override
dataset.images/masks and the named eval/test folders; "" when none);
`dataset_fingerprint` is not read, it is there for the cache key."""
from kfp.dsl import Dataset, Output

from segflow.cluster.kfp_base import component


@component
def example_gen(
    config_slice: str,
    images: str,
    masks: str,
    eval_images: str,
    eval_masks: str,
    test_images: str,
    test_masks: str,
    dataset_fingerprint: str,
    examples: Output[Dataset],
) -> None:
    """Image/mask folders -> Split-train/Split-eval(/Split-test) TFRecords and a quarantine report."""
    from segflow.config.component_config import run_core

    run_core(
        "example_gen", config_slice, examples.path,
        images=images, masks=masks, eval_images=eval_images, eval_masks=eval_masks, test_images=test_images, test_masks=test_masks,
    )
