"""KFP wrapper of Pusher; `registry` (a pipeline parameter) overrides push.registry."""
from kfp.dsl import Artifact, Input, Output

from segflow.cluster.kfp_base import component


@component
def pusher(config_slice: str, registry: str, exports: Input[Artifact], blessing: Input[Artifact], pushed: Output[Artifact]) -> None:
    """Publish blessed exports as a new registry version."""
    from segflow.config.component_config import run_core

    run_core("pusher", config_slice, exports.path, blessing.path, pushed.path, registry=registry)
