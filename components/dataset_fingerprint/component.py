"""KFP wrapper of DatasetFingerprint (the pipeline runs it with caching disabled)."""
from kfp.dsl import Artifact, Output

from segflow.kfp_base import component


@component
def dataset_fingerprint(images: str, masks: str, listing: Output[Artifact]) -> str:
    """sha256 of the image and mask folders' listings; part of ExampleGen's cache key."""
    import os

    from segflow.components.dataset_fingerprint import core
    from segflow.runtime import execute

    return execute("dataset_fingerprint", os.path.dirname(listing.path), core.run, images, masks, listing.path)
