"""KFP wrapper of Pusher; `registry` (a pipeline parameter) overrides push.registry.
`model` gives the network (weights and recipe) later runs warm-start from, `statistics` the
data statistics later runs check drift against; `examples` and
`evaluation` are read for the version's lineage, `config_hash` and
`dataset_fingerprint` recorded in it."""
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from segflow.cluster.kfp_base import component


@component
def pusher(
    config_slice: str,
    registry: str,
    config_hash: str,
    dataset_fingerprint: str,
    exports: Input[Artifact],
    model: Input[Model],
    statistics: Input[Artifact],
    blessing: Input[Artifact],
    examples: Input[Dataset],
    evaluation: Input[Artifact],
    pushed: Output[Artifact],
) -> None:
    """Publish blessed exports as a new registry version with its lineage; make it `current`."""
    from segflow.config.component_config import run_core

    run_core(
        "pusher", config_slice, exports.path, model.path, statistics.path, blessing.path, examples.path, evaluation.path, pushed.path,
        arguments={"config_hash": config_hash, "dataset_fingerprint": dataset_fingerprint}, registry=registry,
    )
