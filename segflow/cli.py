"""`segflow` command line: every command calls segflow.api or the module that does the work (`segflow --help` lists them)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segflow import api
from segflow.config.experiment import ExperimentConfig
from segflow.pipelines.kubeflow import KubeflowError
from segflow.utils.errors import ConfigError

if TYPE_CHECKING:
    from segflow.console import NativeOutput


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return api.load_config(args.config, args.set or [])


def _add_config_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional else None, help="experiment YAML file")
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config key (repeatable); the value is YAML")


def _run(args: argparse.Namespace, kind: str) -> int:
    """`segflow run/validate`. Without --verbose, what the runner process writes natively
    (TensorFlow's banners as it is imported here) goes to the run folder's log.txt."""
    from segflow.console import native_output

    with native_output(not args.verbose) as native:
        return _run_local(args, kind, native)


def _run_local(args: argparse.Namespace, kind: str, native: NativeOutput | None) -> int:
    from segflow.cluster.containers import DEFAULT_IMAGE, ContainerEngineError
    from segflow.pipelines.local import default_output
    from segflow.utils.storage import is_uri

    if args.image and not args.containers:
        print("segflow: error: --image is an option of --containers", file=sys.stderr)
        return 2
    if kind == "train" and args.resume:
        return _resume(args, native)
    if not args.config:
        print(f"segflow: error: {args.command} needs a CONFIG.yaml (or --resume RUN_DIR)", file=sys.stderr)
        return 2
    config = _load(args)
    _warn_cluster_only(config, local_run=True)
    output = args.output or default_output(config)
    image = (args.image or DEFAULT_IMAGE) if args.containers else None
    try:
        summary = api.run(config, output, kind=kind, verbose=args.verbose, image=image, force=kind == "train" and args.force)
        if native is not None and not is_uri(str(output)):
            native.keep(output)  # only now: a refused --output may be another run's folder
    except ContainerEngineError as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    _report(summary, output if is_uri(str(output)) else Path(output).resolve())
    return 0 if summary["status"] in ("succeeded", "skipped") else 1


def _resume(args: argparse.Namespace, native: NativeOutput | None) -> int:
    """`segflow run --resume RUN_DIR`: the run folder's own config; nothing else may change."""
    conflicting = [flag for flag, value in (("CONFIG", args.config), ("--set", args.set), ("--output", args.output), ("--containers", args.containers)) if value]
    if conflicting:
        print(f"segflow: error: --resume continues RUN_DIR with its own config.yaml; drop {', '.join(conflicting)}", file=sys.stderr)
        return 2
    try:
        summary = api.resume(args.resume, verbose=args.verbose)
        if native is not None:
            native.keep(args.resume)
    except (ValueError, FileNotFoundError) as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    _report(summary, Path(args.resume).resolve())
    return 0 if summary["status"] == "succeeded" else 1


def _report(summary: dict, output: str | Path) -> None:
    print(f"\nrun folder: {output}")
    for name, entry in summary["components"].items():
        seconds = f"{entry['seconds']:.1f} s" if "seconds" in entry else ""
        print(f"  {name:<18} {entry['status']:<10} {seconds}{'  ' + entry['error'] if 'error' in entry else ''}")
    if "counts" in summary:
        counts = summary["counts"]
        print(f"examples: {counts['examples_in']} in, {counts['examples_written']} written, {counts['quarantined']} quarantined")
    if "training" in summary and (summary["training"]["batch_halvings"] or summary["training"]["epochs_before_resume"]):
        training = summary["training"]
        print(f"training: batch {training['batch']} ({training['batch_halvings']} halvings), resumed after {training['epochs_before_resume']} epochs")
    metrics = summary.get("metrics", {})
    if "folds" in metrics:
        pooled = metrics["eval"]
        folds = ", ".join(f"fold {entry['fold']} {entry['eval']['mean_iou']:.4f}" for entry in metrics["folds"])
        print(f"mean IoU over {len(metrics['folds'])} folds: {pooled['mean_iou_fold_mean']:.4f} +- {pooled['mean_iou_fold_std']:.4f} ({folds})")
        print(f"mean IoU out of fold (pooled, {pooled['examples']} examples): {pooled['mean_iou']:.4f}")
        if "test" in metrics:
            print(f"mean IoU (test, ensemble of the folds, {metrics['test']['examples']} examples): {metrics['test']['mean_iou']:.4f}")
    elif metrics:
        print(f"mean IoU (eval): {metrics['eval']['mean_iou']:.4f}  blessed: {summary['blessed']}")
        if "test" in metrics:
            print(f"mean IoU (test, {metrics['test']['examples']} examples): {metrics['test']['mean_iou']:.4f}")
    for name, export in summary.get("exports", {}).items():
        if "bytes" not in export:  # skipped: no runtime or hardware for it here
            print(f"  export {name:<15} {export.get('status', 'skipped')}: {export.get('reason', '')}")
            continue
        verdict = "" if export.get("status", "passed") == "passed" else f"  {export['status'].upper()}: {export.get('reason', '')}"
        print(f"  export {name:<15} {export['bytes'] / 1e6:8.2f} MB  mean IoU {export['mean_iou']:.4f}{verdict}")
    if summary.get("blessed") is False and "blessing" in summary:
        print(f"status: {summary['status']}, not blessed: {', '.join(summary['blessing']['failed'])}")
    elif summary["status"] == "skipped":
        print(f"status: skipped: {summary['reason']} (--force trains anyway)")
    else:
        print(f"status: {summary['status']}")


def _compile(args: argparse.Namespace) -> int:
    from segflow.pipelines.pipeline import compile_pipeline

    config = _load(args)
    path = compile_pipeline(config, args.output, kind=args.pipeline, resolve_paths=args.resolve_paths, pipeline_root=args.pipeline_root)
    _warn_cluster_only(config)
    print(f"wrote {path}")
    return 0


def _warn_cluster_only(config: ExperimentConfig, local_run: bool = False) -> None:
    """The parity lint: one line per `kubernetes` key that kfp.local does not apply."""
    from segflow.pipelines.pipeline import parity_warnings

    for line in parity_warnings(config, local_run=local_run):
        print(f"segflow: warning: {line}", file=sys.stderr)


def _connection(args: argparse.Namespace) -> Any:
    from segflow.pipelines.kubeflow import Connection

    token = args.existing_token or os.environ.get("SEGFLOW_KFP_TOKEN") or None
    return Connection(args.host, token, args.namespace, args.kube_context, args.ssl_ca_cert, args.ui_host)


def _submit(args: argparse.Namespace) -> int:
    from segflow.pipelines.kubeflow import submit

    config = _load(args)
    _warn_cluster_only(config)
    account = config.kubernetes.service_account if args.service_account is None else args.service_account
    run = submit(config, _connection(args), args.experiment, args.run_name, args.resolve_paths, args.pipeline_root, account, force=args.force)
    print(f"experiment: {run['experiment']}")
    print(f"run: {run['name']} ({run['run_id']})")
    print(f"url: {run['url'] or '(pass --host or --ui-host to print the run URL)'}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from segflow.pipelines.kubeflow import schedule

    config = _load(args)
    _warn_cluster_only(config)
    account = config.kubernetes.service_account if args.service_account is None else args.service_account
    recurring = schedule(
        config, _connection(args), args.cron, args.max_concurrency, args.no_catchup, args.experiment, args.run_name,
        args.resolve_paths, args.pipeline_root, account,
    )
    catchup = "no catch-up" if args.no_catchup else "missed runs caught up"
    print(f"experiment: {recurring['experiment']}")
    print(f"recurring run: {recurring['name']} ({recurring['recurring_run_id']}), cron {recurring['cron']!r}, "
          f"at most {args.max_concurrency} at a time, {catchup}")
    print(f"url: {recurring['url'] or '(pass --host or --ui-host to print the URL)'}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from segflow.pipelines.kubeflow import list_runs

    rows = list_runs(_connection(args), args.limit, args.experiment)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['state']:<10} {row['created_at'] or '':<26} {row['run_id']}  {row['name']}")
    if not rows:
        print("no runs")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from segflow.export.predict import PredictError, PredictOptions, parse_scale

    try:
        defaults_replaced = {name: getattr(args, name) for name in ("overlap", "batch") if getattr(args, name) is not None}
        options = PredictOptions(
            tta=args.tta, threshold=args.threshold, min_object=args.min_object, min_hole=args.min_hole, scale=parse_scale(args.scale), **defaults_replaced
        )
        result = api.predict(args.model, args.input, args.output, args.format or ["png"], options, spec=args.spec)
    except PredictError as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    print(f"model: {result.model} ({result.model_note}), spec {result.spec_source}", file=sys.stderr)
    scale = result.scale
    print(f"scale: {scale[0]:g} x {scale[1]:g} ({result.scale_source}{'' if options.scale else '; --scale to change'})", file=sys.stderr)
    report = result.report
    print(f"predicted {report['written']} of {report['images']} images in {report['seconds']:.1f} s; wrote {Path(args.output).resolve()}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} (listed in {Path(args.output) / 'predict.json'}):", file=sys.stderr)
        for entry in report["skipped"]:
            print(f"  {entry['reason']}", file=sys.stderr)
        return 1
    return 0


def _preview(args: argparse.Namespace) -> int:
    from segflow.train.preview import write_preview

    written = write_preview(_load(args), args.output, args.count)
    print(f"wrote {written['grid']} ({written['examples']} examples) and the resolved policy {written['policy']}")
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    from segflow.pipelines.local import default_output
    from segflow.pipelines.lr_find import SweepSettings, find_learning_rate

    config = _load(args)
    settings = SweepSettings(steps=args.steps, min_rate=args.min_rate, max_rate=args.max_rate)
    result = find_learning_rate(config, args.output or f"{default_output(config)}-lr-find", settings)
    print(f"suggested learning rate: {result['suggested_learning_rate']:.3g} ({result['steps']} steps; curve {result['plot']})")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from segflow.export.benchmark import (
        BenchmarkError,
        BenchmarkSettings,
        benchmark,
        markdown,
    )
    from segflow.utils.io import write_json

    try:
        settings = BenchmarkSettings(
            threads=tuple(range(1, args.max_threads + 1)) if args.max_threads else BenchmarkSettings().threads, runs=args.runs, warmup=args.warmup
        )
        table = benchmark(args.path, settings, args.format)
    except BenchmarkError as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output) / "benchmark.json", table)
        (Path(args.output) / "benchmark.md").write_text(markdown(table))
    print(json.dumps(table, indent=2) if args.json else markdown(table), end="" if not args.json else "\n")
    return 0


def _html_report(args: argparse.Namespace) -> int:
    from segflow.evaluate.report import ReportError, write_report

    defaults_replaced = {name: getattr(args, name) for name in ("worst", "samples") if getattr(args, name) is not None}
    try:
        path = write_report(args.run_dir, args.output, **defaults_replaced)
    except ReportError as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from segflow.data.demo_data import CLASS_NAMES, write_demo_dataset

    root = write_demo_dataset(args.directory, count=args.count, size=args.size, seed=args.seed)
    print(f"wrote {args.count} image/mask pairs ({', '.join(CLASS_NAMES)}) to {root}/images and {root}/masks")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from segflow.evaluate.analyze import (
        AnalyzeError,
        compare,
        console,
        load_runs,
        write_csv,
        write_html,
    )

    try:
        comparison = compare(load_runs(args.runs), args.metric)
    except AnalyzeError as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    print(console(comparison), end="")
    if args.csv:
        write_csv(comparison, args.csv)
        print(f"wrote {Path(args.csv).resolve()}")
    if args.html:
        write_html(comparison, args.html)
        print(f"wrote {Path(args.html).resolve()}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    """`segflow registry list|show|promote|rollback`: read a model registry, or move its
    `current` alias by hand (recorded with who moved it)."""
    import getpass
    import socket

    from segflow.export import model_registry as registry

    who = f"{getpass.getuser()}@{socket.gethostname()} (segflow registry {args.action})"
    try:
        if args.action == "list":
            rows = registry.version_rows(args.registry, args.name)
            if not rows:
                print(f"segflow: error: no committed version of {args.name!r} in {args.registry}", file=sys.stderr)
                return 2
            print(json.dumps(rows, indent=2) if args.json else registry.format_rows(rows), end="\n" if args.json else "")
        elif args.action == "show":
            record = {
                "commit": registry.read_commit(args.registry, args.name, args.version),
                "lineage": registry.read_lineage(args.registry, args.name, args.version),
                "location": registry.version_location(args.registry, args.name, args.version),
            }
            print(json.dumps(record, indent=2))
        else:
            if args.action == "promote":
                moved = registry.move_current(args.registry, args.name, args.version, expected=registry.ANY_CURRENT, by=who, reason=args.reason or "promoted by hand")
            else:
                moved = registry.rollback(args.registry, args.name, by=who, reason=args.reason or "rollback")
            print(f"{args.name}: current is version {moved.current} (previous: {moved.previous})")
    except (FileNotFoundError, ValueError) as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    return 0


def _schema(args: argparse.Namespace) -> int:
    from segflow.config.experiment import config_schema

    text = json.dumps(config_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; point a config at it with the first line  # yaml-language-server: $schema=<its path relative to the config, or a URL>", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _list(args: argparse.Namespace) -> int:
    from segflow.utils.registry import REGISTRIES

    if args.kind == "exports" and args.json:
        from segflow.export.exporters import capability_table

        print(json.dumps(capability_table(), indent=2))
        return 0
    entries = REGISTRIES[args.kind].describe()
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        width = max(map(len, entries), default=0)
        for name, description in entries.items():
            print(f"{name:<{width}}  {description}")
    return 0


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """What kfp.Client takes to reach and authenticate to Kubeflow Pipelines."""
    parser.add_argument(
        "--host", metavar="URL", help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 (default: KF_PIPELINES_ENDPOINT, "
        "else the in-cluster service or the current kubeconfig context's cluster)"
    )
    parser.add_argument("--existing-token", metavar="TOKEN", help="bearer token sent to --host (default: SEGFLOW_KFP_TOKEN)")
    parser.add_argument("--namespace", metavar="NAME", help="your profile namespace on a multi-user Kubeflow")
    parser.add_argument("--kube-context", metavar="NAME", help="kubeconfig context to use when there is no --host")
    parser.add_argument("--ssl-ca-cert", metavar="FILE", help="CA certificate of an HTTPS --host")
    parser.add_argument("--ui-host", metavar="URL", help="the Kubeflow Pipelines UI, for printed links (default: --host)")


def _add_local_run_commands(commands: argparse._SubParsersAction) -> None:
    """run and validate: the DAG on this machine."""
    for kind, command, summary in (
        ("train", "run", "run the whole DAG locally (kfp.local)"),
        ("validate", "validate", "ExampleGen, statistics, schema and data validation only"),
    ):
        local_run = commands.add_parser(command, help=summary)
        _add_config_arguments(local_run, optional=kind == "train")
        local_run.add_argument("--output", "-o", help="run folder: a path or a gs:// / s3:// URI, uploaded when the run ends (default runs/<name>-<timestamp>)")
        local_run.add_argument("--verbose", "-v", action="store_true", help="show all subprocess output, TensorFlow and KFP logs included")
        local_run.add_argument(
            "--containers",
            action="store_true",
            help="run every component in a container of the segflow image (kfp.local DockerRunner; a Docker daemon, "
            "or podman's API service, started when needed); build the image with containers/build.sh",
        )
        local_run.add_argument("--image", metavar="NAME", help="the image for --containers (default segflow:<version>, what containers/build.sh tags)")
        if kind == "train":
            local_run.add_argument(
                "--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR with its config.yaml: the data components run "
                "again, the trainer continues from its last finished epoch with its optimizer state"
            )
            local_run.add_argument(
                "--force", action="store_true", help="train even when the data and config are those of the registry's current version "
                "(without it such a run stops after the fingerprint with status skipped, exit code 0)"
            )
        local_run.set_defaults(handler=lambda args, kind=kind: _run(args, kind))


def _add_kubeflow_commands(commands: argparse._SubParsersAction) -> None:
    """compile, submit, schedule, runs: the DAG on Kubeflow Pipelines."""
    compile_ = commands.add_parser("compile", help="write the KFP v2 pipeline YAML for Kubeflow")
    _add_config_arguments(compile_)
    compile_.add_argument("--output", "-o", required=True, help="YAML file to write")
    compile_.add_argument("--pipeline", choices=["train", "validate"], default="train")
    compile_.add_argument(
        "--resolve-paths",
        action="store_true",
        help="make relative dataset/registry/validation paths absolute against the current directory "
        "(for a cluster whose pods mount them at the same path); without it a relative path is an error",
    )
    compile_.add_argument(
        "--pipeline-root",
        metavar="URI",
        help="the compiled pipeline's default pipeline root, where KFP writes the artifacts: a gs:// / s3:// URI "
        "or an absolute path (without it, the cluster's default)",
    )
    compile_.set_defaults(handler=_compile)

    submit = commands.add_parser("submit", help="compile the pipeline and start a run on Kubeflow Pipelines")
    schedule = commands.add_parser("schedule", help="compile the pipeline and create a recurring run on Kubeflow Pipelines")
    for parser_ in (submit, schedule):
        _add_config_arguments(parser_)
        _add_connection_arguments(parser_)
        parser_.add_argument("--experiment", metavar="NAME", help="KFP experiment, created when missing (default: the config's name)")
        parser_.add_argument("--run-name", metavar="NAME", help="the run's (recurring run's) display name")
        parser_.add_argument("--resolve-paths", action="store_true", help="as in compile: make relative paths absolute against the current directory")
        parser_.add_argument("--pipeline-root", metavar="URI", help="as in compile: overrides kubernetes.pipeline_root")
        parser_.add_argument(
            "--service-account", metavar="NAME", help="Kubernetes service account of the run's pods (default kubernetes.service_account; '' for KFP's default)"
        )
    submit.add_argument("--force", action="store_true", help="train even when the data and config are those of the registry's current version")
    submit.set_defaults(handler=_submit)
    schedule.add_argument("--cron", required=True, help='when to run: "0 3 * * 1" (minute hour day month weekday) or six fields, seconds first')
    schedule.add_argument("--max-concurrency", type=int, default=1, metavar="N", help="runs of this schedule at the same time (default 1)")
    schedule.add_argument("--no-catchup", action="store_true", help="after a pause, run once instead of once per missed interval")
    schedule.set_defaults(handler=_schedule)

    runs = commands.add_parser("runs", help="recent runs on Kubeflow Pipelines and their states")
    _add_connection_arguments(runs)
    runs.add_argument("--limit", type=int, default=10, metavar="N", help="how many runs, newest first (default 10)")
    runs.add_argument("--experiment", metavar="NAME", help="only this experiment's runs")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(handler=_runs)


def _add_predict_command(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="segment images of any size with a trained model (tiles with overlap, blended)")
    predict.add_argument(
        "model", help="a SavedModel folder, a run folder (its served model), an exports folder or pushed version (its saved_model), or a .tflite or .onnx file"
    )
    predict.add_argument("input", help="an image file or a folder of images (PNG, JPEG, TIFF, BMP; 8 or 16 bit; 1, 3 or 4 channels; any size)")
    predict.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder (created; files of the same name are replaced)")
    predict.add_argument(
        "--format", action="append", choices=["png", "overlay", "rle"],
        help="png: <stem>.png class ids (default); overlay: <stem>_overlay.png coloured; rle: rle.csv (filename,class,rle; Kaggle "
        "run-length, column-major, 1-based). Repeatable",
    )
    predict.add_argument("--spec", metavar="PATH", help="serving_spec.json (or its folder) for a .tflite file without a sidecar JSON or a spec beside it or in its run, "
                         "or to override a model's own")
    predict.add_argument("--overlap", type=float, metavar="SHARE", help="share of the model size that neighbouring tiles overlap (default 0.25)")
    predict.add_argument(
        "--scale", default="auto", metavar="auto|F|FY,FX",
        help="resize images by F before tiling (masks come back at full size): the model sees objects at the size it was "
        "trained on. auto (default): the run's training scale (model size / train image size) when the model is in a run "
        "folder whose train images had one size, else 1 (the file's resolution)",
    )
    predict.add_argument("--tta", action="store_true", help="average each tile over its four flips (4x slower)")
    predict.add_argument("--threshold", type=float, metavar="P", help="sigmoid models: foreground where p > P (default 0.5)")
    predict.add_argument("--min-object", type=int, default=0, metavar="N", help="relabel regions of classes other than 0 smaller than N pixels")
    predict.add_argument("--min-hole", type=int, default=0, metavar="N", help="fill regions of class 0 smaller than N pixels from their surroundings")
    predict.add_argument("--batch", type=int, metavar="N", help="tiles per model call (default 4)")
    predict.set_defaults(handler=_predict)


def _add_experiment_tools(commands: argparse._SubParsersAction) -> None:
    """preview and lr-find: look at what the trainer will see before a run."""
    from segflow.pipelines.lr_find import SweepSettings

    preview = commands.add_parser("preview", help="a PNG grid of augmented train images and masks, as the trainer sees them, and the resolved policy")
    _add_config_arguments(preview)
    preview.add_argument("-n", "--count", type=int, default=8, metavar="N", help="cells in the grid (default 8)")
    preview.add_argument("--output", "-o", required=True, metavar="PNG", help="the grid; the policy goes beside it as <name>.policy.json")
    preview.set_defaults(handler=_preview)

    lr_find = commands.add_parser("lr-find", help="sweep the learning rate over training steps: loss curve PNG and a suggested rate (JSON)")
    _add_config_arguments(lr_find)
    lr_find.add_argument(
        "--output", "-o", metavar="DIR", help="gets lr_find.png, lr_find.json and the data components' folders (default runs/<name>-<timestamp>-lr-find)"
    )
    lr_find.add_argument("--steps", type=int, default=SweepSettings.steps, help=f"training steps, one rate each (default {SweepSettings.steps})")
    lr_find.add_argument("--min-rate", type=float, default=SweepSettings.min_rate, help=f"first rate (default {SweepSettings.min_rate:g})")
    lr_find.add_argument("--max-rate", type=float, default=SweepSettings.max_rate, help=f"last rate (default {SweepSettings.max_rate:g})")
    lr_find.set_defaults(handler=_lr_find)


def _add_result_commands(commands: argparse._SubParsersAction) -> None:
    """benchmark and report: look at what a run made."""
    bench = commands.add_parser("benchmark", help="size, latency per image at 1..N threads and mean IoU of each built export")
    bench.add_argument("path", metavar="RUN_DIR|EXPORTS_DIR", help="a run folder, its exporter/exports folder, or a pushed version")
    bench.add_argument("--max-threads", type=int, metavar="N", help="measure at 1..N threads (default: 1 and all cores)")
    bench.add_argument("--runs", type=int, default=15, metavar="K", help="interleaved rounds per thread count; the ratio compares medians (default 15)")
    bench.add_argument("--warmup", type=int, default=2, metavar="K", help="untimed rounds first (default 2)")
    bench.add_argument("--format", action="append", metavar="NAME", help="only this export (repeatable; default: every built one)")
    bench.add_argument("--output", "-o", metavar="DIR", help="also write benchmark.json and benchmark.md there")
    bench.add_argument("--json", action="store_true", help="print the JSON table instead of markdown")
    bench.set_defaults(handler=_benchmark)

    report = commands.add_parser("report", help="one self-contained HTML page of a run: curves, per-class IoU, confusion matrix, predictions, slices, exports, data")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `segflow run`")
    report.add_argument("--output", "-o", metavar="FILE", help="the page to write (default RUN_DIR/report.html)")
    report.add_argument("--worst", type=int, metavar="K", help="eval images with the lowest per-image mean IoU to show (default 6; 0: none)")
    report.add_argument("--samples", type=int, metavar="N", help="eval images to show with the served model's prediction (default 4; 0: none)")
    report.set_defaults(handler=_html_report)


def _add_utility_commands(commands: argparse._SubParsersAction) -> None:
    """demo-data, schema, list, analyze."""
    from segflow.utils.registry import REGISTRIES

    demo = commands.add_parser("demo-data", help="write the built-in synthetic dataset")
    demo.add_argument("directory")
    demo.add_argument("--count", type=int, default=64)
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_data)

    schema = commands.add_parser("schema", help="print the JSON Schema of the experiment config, for editors' completion and inline errors")
    schema.add_argument("--output", "-o", metavar="FILE", help="write it to FILE instead of standard output")
    schema.set_defaults(handler=_schema)

    list_ = commands.add_parser("list", help="list registered entries of a kind")
    list_.add_argument("kind", choices=sorted(REGISTRIES))
    list_.add_argument("--json", action="store_true")
    list_.set_defaults(handler=_list)

    analyze = commands.add_parser("analyze", help="compare runs: the config keys that differ and their metrics, best first")
    analyze.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run folder, or a folder of run folders")
    analyze.add_argument("--metric", default="mean_iou", help="rank by this eval metric, or SECTION.METRIC such as test.mean_iou (default mean_iou)")
    analyze.add_argument("--csv", metavar="FILE", help="also write one row per run as CSV")
    analyze.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with per-class IoU and training-curve plots")
    analyze.set_defaults(handler=_analyze)

    registry = commands.add_parser("registry", help="a model registry's versions, lineage and aliases; promote or roll back what serves")
    actions = registry.add_subparsers(dest="action", required=True)
    for action, summary in (
        ("list", "every committed version: created, blessed, eval mean IoU, parent, alias"),
        ("show", "one version's commit record and lineage (data, config hash, source, metrics, blessing, run) as JSON"),
        ("promote", "make VERSION current (the version it replaces becomes previous)"),
        ("rollback", "make previous current again"),
    ):
        parser = actions.add_parser(action, help=summary)
        if action in ("show", "promote"):
            parser.add_argument("version", type=int, metavar="VERSION")
        parser.add_argument("--registry", default="model-registry", help="the registry folder or gs:// / s3:// URI (default: model-registry, push.registry's default)")
        parser.add_argument("--name", required=True, help="the model's name (the config's `name`)")
        if action == "list":
            parser.add_argument("--json", action="store_true", help="the rows as JSON")
        if action in ("promote", "rollback"):
            parser.add_argument("--reason", help="recorded with the move")
        parser.set_defaults(handler=_registry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segflow", description="Image-segmentation training pipeline (TFX-style components on KFP and Beam).")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_add_local_run_commands, _add_kubeflow_commands, _add_predict_command, _add_experiment_tools, _add_result_commands, _add_utility_commands):
        add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileExistsError) as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2
    except KubeflowError as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
