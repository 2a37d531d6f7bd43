"""KFP wrapper of DatasetFingerprint (the pipeline runs it with caching disabled)."""
from kfp.dsl import Artifact, Output

from segflow.cluster.kfp_base import component


@component
def dataset_fingerprint(
    images: str, masks: str, eval_images: str, eval_masks: str, test_images: str, test_masks: str, listing: Output[Artifact]
) -> str:
    """sha256 of the dataset folders' listings (named eval/test folders: "" when none); part of ExampleGen's cache key."""
    import os

    from segflow.components.dataset_fingerprint import core
    from segflow.utils.runtime import execute

    folders = {"images": images, "masks": masks, "eval_images": eval_images, "eval_masks": eval_masks, "test_images": test_images, "test_masks": test_masks}
    return execute("dataset_fingerprint", os.path.dirname(listing.path), core.run, folders, listing.path)
