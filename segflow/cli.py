"""`segflow` command line: run, validate, compile, demo-data, list."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segflow.config import ConfigError, ExperimentConfig, load_config


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.set or [])


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config key (repeatable); the value is YAML")


def _run(args: argparse.Namespace, kind: str) -> int:
    from segflow.pipelines.local import default_output, run_local
    from segflow.storage import is_uri

    config = _load(args)
    output = args.output or default_output(config)
    summary = run_local(config, output, kind=kind, verbose=args.verbose)
    _report(summary, output if is_uri(str(output)) else Path(output).resolve())
    return 0 if summary["status"] == "succeeded" else 1


def _report(summary: dict, output: str | Path) -> None:
    print(f"\nrun folder: {output}")
    for name, entry in summary["components"].items():
        seconds = f"{entry['seconds']:.1f} s" if "seconds" in entry else ""
        print(f"  {name:<18} {entry['status']:<10} {seconds}{'  ' + entry['error'] if 'error' in entry else ''}")
    if "counts" in summary:
        counts = summary["counts"]
        print(f"examples: {counts['examples_in']} in, {counts['examples_written']} written, {counts['quarantined']} quarantined")
    if "metrics" in summary:
        print(f"mean IoU (eval): {summary['metrics']['eval']['mean_iou']:.4f}  blessed: {summary['blessed']}")
    for name, export in summary.get("exports", {}).items():
        print(f"  export {name:<15} {export['bytes'] / 1e6:8.2f} MB  mean IoU {export['mean_iou']:.4f}")
    print(f"status: {summary['status']}")


def _compile(args: argparse.Namespace) -> int:
    from segflow.pipelines.pipeline import compile_pipeline

    path = compile_pipeline(_load(args), args.output, kind=args.pipeline, resolve_paths=args.resolve_paths, pipeline_root=args.pipeline_root)
    print(f"wrote {path}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from segflow.demo_data import CLASS_NAMES, write_demo_dataset

    root = write_demo_dataset(args.directory, count=args.count, size=args.size, seed=args.seed)
    print(f"wrote {args.count} image/mask pairs ({', '.join(CLASS_NAMES)}) to {root}/images and {root}/masks")
    return 0


def _list(args: argparse.Namespace) -> int:
    from segflow.registry import REGISTRIES

    if args.kind == "exports" and args.json:
        from segflow.exporters import capability_table

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


def build_parser() -> argparse.ArgumentParser:
    from segflow.registry import REGISTRIES

    parser = argparse.ArgumentParser(prog="segflow", description="Image-segmentation training pipeline (TFX-style components on KFP and Beam).")
    commands = parser.add_subparsers(dest="command", required=True)

    for kind, command, summary in (
        ("train", "run", "run the whole DAG locally (kfp.local)"),
        ("validate", "validate", "ExampleGen, statistics, schema and data validation only"),
    ):
        local_run = commands.add_parser(command, help=summary)
        _add_config_arguments(local_run)
        local_run.add_argument("--output", "-o", help="run folder: a path or a gs:// / s3:// URI, uploaded when the run ends (default runs/<name>-<timestamp>)")
        local_run.add_argument("--verbose", "-v", action="store_true", help="show all subprocess output, TensorFlow and KFP logs included")
        local_run.set_defaults(handler=lambda args, kind=kind: _run(args, kind))

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

    demo = commands.add_parser("demo-data", help="write the built-in synthetic dataset")
    demo.add_argument("directory")
    demo.add_argument("--count", type=int, default=64)
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_data)

    list_ = commands.add_parser("list", help="list registered entries of a kind")
    list_.add_argument("kind", choices=sorted(REGISTRIES))
    list_.add_argument("--json", action="store_true")
    list_.set_defaults(handler=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileExistsError) as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
