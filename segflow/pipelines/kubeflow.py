"""Kubeflow Pipelines from the command line: submit a run, schedule a recurring run, list runs.

Everything goes through `kfp.Client`, with the authentication it supports passed through:
an explicit host (and `existing_token`), or no host, in which case kfp.Client uses the
in-cluster service account or the current kubeconfig context (through the API server's
proxy to the ml-pipeline service). The pipeline is compiled locally (no cluster needed;
relative paths are an error, as in `segflow compile`) and sent inline as the run's
pipeline spec, with the dataset and registry locations as explicit run parameters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from segflow.config.experiment import ExperimentConfig
from segflow.utils.errors import ConfigError

KFP_UI_ENV = "KF_PIPELINES_UI_ENDPOINT"


class KubeflowError(RuntimeError):
    """Kubeflow Pipelines refused a request or could not be reached."""


@dataclasses.dataclass(frozen=True)
class Connection:
    """How to reach Kubeflow Pipelines; every field is optional, as in kfp.Client."""

    host: str | None = None
    existing_token: str | None = None
    namespace: str | None = None
    kube_context: str | None = None
    ssl_ca_cert: str | None = None
    ui_host: str | None = None

    def client(self) -> Any:
        import kfp

        arguments: dict[str, Any] = {"host": self.host, "existing_token": self.existing_token, "kube_context": self.kube_context}
        arguments.update(ssl_ca_cert=self.ssl_ca_cert, ui_host=self.ui_host)
        if self.namespace:
            arguments["namespace"] = self.namespace
        with warnings.catch_warnings(), _kfp_prints():
            warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")  # "only works with KFP v2.0.0-beta.2 and later"
            return _call(kfp.Client, self, **arguments)

    def url(self, kind: str, identifier: str) -> str | None:
        """The UI's page of a run or recurring run (None when the UI's address is unknown)."""
        base = self.ui_host or os.environ.get(KFP_UI_ENV) or self.host
        if not base:
            return None
        base = base if base.startswith(("http://", "https://")) else f"https://{base}"
        return f"{base.rstrip('/')}/#/{kind}/details/{identifier}"


@contextlib.contextmanager
def _kfp_prints() -> Any:
    """kfp.Client prints its own links ("Experiment details: ..."); segflow prints its lines."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _call(function: Any, connection: Connection, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` with kfp's API and connection errors as KubeflowError."""
    import kfp_server_api
    import urllib3

    where = connection.host or "the kubeconfig's cluster"
    try:
        return function(*args, **kwargs)
    except kfp_server_api.ApiException as error:
        body = (error.body or "").strip() if isinstance(error.body, str) else error.body
        raise KubeflowError(f"Kubeflow Pipelines at {where} answered {error.status} {error.reason}: {body}") from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as error:
        raise KubeflowError(f"cannot reach Kubeflow Pipelines at {where}: {error}") from None


def cron_expression(cron: str) -> str:
    """KFP's scheduler reads six fields, seconds first; a usual five-field expression
    ("0 3 * * 1": Mondays at 03:00) gets second 0."""
    fields = cron.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"--cron {cron!r}: expected 5 fields (minute hour day month weekday) or 6 (seconds first)")


def _compile(config: ExperimentConfig, directory: str, resolve_paths: bool, pipeline_root: str | None) -> str:
    from segflow.pipelines.pipeline import compile_pipeline

    return str(compile_pipeline(config, Path(directory) / "pipeline.yaml", resolve_paths=resolve_paths, pipeline_root=pipeline_root))


def run_parameters(config: ExperimentConfig, resolve_paths: bool = False) -> dict[str, str]:
    """The run's pipeline parameters: the config's dataset folders and registry (named eval/test
    folders only when the config has them; the compiled default of the others is "")."""
    from segflow.config.component_config import (
        OPTIONAL_PARAMETERS,
        location_arguments,
        resolve_locations,
    )
    from segflow.pipelines.pipeline import PARAMETERS

    arguments = location_arguments(resolve_locations(config) if resolve_paths else config, PARAMETERS["train"])
    return {name: value for name, value in arguments.items() if value or name not in OPTIONAL_PARAMETERS}


def _experiment_id(client: Any, connection: Connection, name: str) -> str:
    with _kfp_prints():
        experiment = _call(client.create_experiment, connection, name=name, namespace=connection.namespace)  # gets it when it exists
    return experiment.experiment_id


@contextlib.contextmanager
def _prepared(
    config: ExperimentConfig, connection: Connection, experiment: str, resolve_paths: bool, pipeline_root: str | None
) -> Iterator[tuple[Any, str, str]]:
    """What submit and schedule both need: the compiled package (in a temporary folder that
    lives as long as the block), a client, and the experiment's id (created if missing)."""
    with tempfile.TemporaryDirectory(prefix="segflow-kfp-") as directory:
        package = _compile(config, directory, resolve_paths, pipeline_root)
        client = connection.client()
        yield client, package, _experiment_id(client, connection, experiment)


def submit(
    config: ExperimentConfig,
    connection: Connection,
    experiment: str | None = None,
    run_name: str | None = None,
    resolve_paths: bool = False,
    pipeline_root: str | None = None,
    service_account: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compile the training pipeline and create a run of it; returns run_id, name,
    experiment and url. The compiled spec goes inline with the run (no upload needed).
    `force`: the run trains even when nothing changed since the registry's current version."""
    experiment = experiment or config.name
    run_name = run_name or f"segflow-{config.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with _prepared(config, connection, experiment, resolve_paths, pipeline_root) as (client, package, experiment_id), _kfp_prints():
        result = _call(
            client.create_run_from_pipeline_package,
            connection,
            pipeline_file=package,
            arguments={**run_parameters(config, resolve_paths), **({"force": True} if force else {})},
            run_name=run_name,
            experiment_id=experiment_id,
            service_account=service_account or None,
        )
    return {"run_id": result.run_id, "name": run_name, "experiment": experiment, "url": connection.url("runs", result.run_id)}


def schedule(
    config: ExperimentConfig,
    connection: Connection,
    cron: str,
    max_concurrency: int = 1,
    no_catchup: bool = False,
    experiment: str | None = None,
    name: str | None = None,
    resolve_paths: bool = False,
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """Compile the training pipeline and create an enabled recurring run on `cron`; returns
    recurring_run_id, name, cron (six fields), experiment and url."""
    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {max_concurrency}: at least 1")
    expression = cron_expression(cron)
    experiment = experiment or config.name
    name = name or f"segflow-{config.name} retraining"
    with _prepared(config, connection, experiment, resolve_paths, pipeline_root) as (client, package, experiment_id), _kfp_prints():
        recurring = _call(
            client.create_recurring_run,
            connection,
            experiment_id=experiment_id,
            job_name=name,
            description=f"segflow {config.name}: scheduled retraining ({cron})",
            cron_expression=expression,
            max_concurrency=max_concurrency,
            no_catchup=no_catchup,
            params=run_parameters(config, resolve_paths),
            pipeline_package_path=package,
            enabled=True,
            service_account=service_account or None,
        )
    identifier = recurring.recurring_run_id
    return {"recurring_run_id": identifier, "name": name, "cron": expression, "experiment": experiment, "url": connection.url("recurringrun", identifier)}


def list_runs(connection: Connection, limit: int = 10, experiment: str | None = None) -> list[dict[str, Any]]:
    """The most recent runs, newest first: run_id, name, state, created_at, finished_at, url."""
    client = connection.client()
    experiment_id = None
    if experiment:
        with _kfp_prints():
            try:
                experiment_id = _call(client.get_experiment, connection, experiment_name=experiment, namespace=connection.namespace).experiment_id
            except ValueError as error:
                raise KubeflowError(str(error)) from None
    response = _call(client.list_runs, connection, page_size=limit, sort_by="created_at desc", experiment_id=experiment_id, namespace=connection.namespace)
    rows = []
    for run in response.runs or []:
        rows.append(
            {
                "run_id": run.run_id,
                "name": run.display_name,
                "state": run.state or "UNKNOWN",
                "created_at": run.created_at.isoformat() if run.created_at else None,
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "url": connection.url("runs", run.run_id),
            }
        )
    return rows
