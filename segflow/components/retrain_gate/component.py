"""KFP wrapper of RetrainGate; `registry` (a pipeline parameter) overrides push.registry."""
from kfp.dsl import Artifact, Output

from segflow.cluster.kfp_base import component


@component
def retrain_gate(config_slice: str, registry: str, config_hash: str, dataset_fingerprint: str, force: bool, decision: Output[Artifact]) -> bool:
    """Whether to train: something changed since the registry's current version, or `force`.
    The answer is the single output `Output`: kfp.local resolves a dsl.If on a task output
    only by that name."""
    from segflow.config.component_config import run_core

    return bool(
        run_core(
            "retrain_gate", config_slice, decision.path,
            arguments={"config_hash": config_hash, "dataset_fingerprint": dataset_fingerprint, "force": force}, registry=registry,
        )
    )
