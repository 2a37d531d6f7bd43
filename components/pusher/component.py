"""KFP wrapper of Pusher."""
from kfp.dsl import Artifact, Input, Output

from segflow.kfp_base import component


@component
def pusher(config_json: str, exports: Input[Artifact], blessing: Input[Artifact], pushed: Output[Artifact]) -> None:
    """Publish blessed exports as a new registry version."""
    import os

    from segflow.components.pusher import core
    from segflow.config import ExperimentConfig
    from segflow.runtime import execute

    execute("pusher", os.path.dirname(pushed.path), core.run, ExperimentConfig.from_json(config_json), exports.path, blessing.path, pushed.path)
