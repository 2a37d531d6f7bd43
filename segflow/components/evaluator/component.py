"""KFP wrapper of Evaluator; `registry` (a pipeline parameter) overrides push.registry (the baseline's registry)."""
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Metrics,
    Model,
    Output,
)

from segflow.cluster.kfp_base import component


@component
def evaluator(
    config_slice: str,
    registry: str,
    examples: Input[Dataset],
    model: Input[Model],
    model_run: Input[Artifact],
    statistics: Input[Artifact],
    anomalies: Input[Artifact],
    evaluation: Output[Artifact],
    blessing: Output[Artifact],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    report: Output[HTML],
    fold: int = -1,
) -> bool:
    """Per-class IoU/precision/recall on the eval split (a k-fold run: the fold `fold`), the
    blessing (returned: the DAG exports and pushes only a blessed model), and the metrics,
    confusion matrix and report page as artifacts the Kubeflow UI shows (`model_run`,
    `statistics` and `anomalies` are read by the page only). The blessing is the
    single output `Output`: kfp.local resolves a dsl.If on a task output only by that name."""
    from segflow.components.evaluator.core import log_kfp_metrics
    from segflow.config.component_config import run_core
    from segflow.evaluate.evaluation import is_blessed
    from segflow.evaluate.report import write_task_report

    run_core("evaluator", config_slice, examples.path, model.path, evaluation.path, blessing.path, fold=fold, registry=registry)
    log_kfp_metrics(evaluation.path, metrics, confusion_matrix)
    write_task_report(
        report.path, evaluation.path, blessing.path, model.path, examples.path if fold < 0 else None, statistics.path, anomalies.path, model_run.path
    )
    return is_blessed(blessing.path)
