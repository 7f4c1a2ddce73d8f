"""Command line: ``evo-subens run CONFIG [key=value ...]``, ``evo-subens config``, ``evo-subens export``,
``evo-subens distill``, ``evo-subens bench``."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from .core.config import field_docs, load_config
from .errors import UserError
from .bench.commands import add_bench_commands
from .core.progress import say, start_cli_clock

EXAMPLES = """Overrides are dotted key=value pairs after the config, values parsed as YAML.

examples:
  evo-subens run configs/default.yaml
  evo-subens run configs/default.yaml search.population=64 children.density=0.01 name=dense-sweep
  evo-subens resume runs/default-s0-20261126-033727 search.generations=8
  evo-subens grow runs/default-s0-20261126-033727 --members 4
  evo-subens report runs/default-s0-20261126-033727
  evo-subens export runs/default-s0-20261126-033727 --format onnx
  evo-subens distill runs/default-s0-20261126-033727 --epochs 10
  evo-subens export runs/default-s0-20261126-033727 --student --format torchscript
  evo-subens config configs/default.yaml search.generations=5
  evo-subens bench throughput --models cnn,mlp10m
  evo-subens bench streaming --images 8000 --size 64
  evo-subens bench latency runs/packed-s0-20261203-163703 --batches 1,256
  evo-subens bench packed --configs configs/study/packed/mnist1d --seeds 0,1,2
  evo-subens bench quality --seeds 0,1,2 --configs configs/study/mnist1d,configs/study/digits
  evo-subens bench loop --seeds 0,1,2,3,4 --configs configs/study/loop/mnist1d
"""


def _with_address(args: argparse.Namespace) -> list[str]:
    """The overrides, with ``--address`` last so it wins (JSON-quoted: YAML would read some host:port as
    numbers)."""
    if args.address is None:
        return list(args.overrides)
    return [*args.overrides, f"workers.address={json.dumps(args.address)}"]


ADDRESS_HELP = ("Ray cluster to join (head node host:port); the same as workers.address=..., and it wins over "
                "the config and RAY_ADDRESS")


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = _with_address(args)
    say(f"[run] {args.config}: checking the config")  # checking imports torch (the families): seconds
    load_config(args.config, overrides)  # a config error stops here, before more seconds of imports
    say(f"[run] {args.config}: config valid; loading the engine")
    from .core.runner import run

    run(args.config, overrides)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    say(f"[resume] {args.run_dir}: loading the engine")
    from .core.runner import resume

    resume(args.run_dir, _with_address(args))
    return 0


def _cmd_grow(args: argparse.Namespace) -> int:
    say(f"[grow] {args.run_dir}: loading the engine")
    from .core.runner import grow

    grow(args.run_dir, args.members, generations=args.generations)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report.run_report import write_report

    write_report(args.path, features=not args.no_features)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    say(f"[export] {args.run_dir}: loading the engine")  # torch and the exporters: seconds
    from .export import export_ensemble

    export_ensemble(args.run_dir, args.format, args.out, model="student" if args.student else "ensemble")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    say(f"[distill] {args.run_dir}: loading the engine")
    from .distillation import distill

    distill(args.run_dir, epochs=args.epochs, lr=args.lr, alpha=args.alpha)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.fields:
        for name, doc, default in field_docs():
            print(f"{name:<32} {doc} (default: {default!r})")
        return 0
    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config:  # only overrides, on the built-in defaults
        overrides.insert(0, args.config)
        args.config = None
    cfg = load_config(args.config, overrides)
    from .core.rundir import used_config  # here: it loads torch, which the other commands' help does not need

    print(yaml.safe_dump(used_config(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``evo-subens`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="evo-subens", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Build neural-network ensembles from one trained parent: evolve noisy child subnetworks, "
                    "evaluate them in parallel Ray actors, keep the best as an ensemble.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(commands)
    _add_export_command(commands)
    _add_distill_command(commands)
    add_bench_commands(commands)
    return parser


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    """run, resume, grow, report, config."""
    run_parser = commands.add_parser(
        "run", help="train (or load) a parent, evolve children, build and test the ensemble",
        description="Run a config. Results go to <output_dir>/<name>/ (config.yaml, parent.pt, "
                    "population.parquet, members.json, metrics.json).")
    run_parser.add_argument("config", help="YAML config file, e.g. configs/default.yaml")
    run_parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="dotted overrides parsed as YAML, e.g. search.population=64 workers.executor=local")
    run_parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    run_parser.set_defaults(handler=_cmd_run)

    resume_parser = commands.add_parser(
        "resume", help="go on with a stopped run from its newest usable checkpoint",
        description="Resume runs/<name> from its newest usable checkpoint (a corrupted newest one falls back "
                    "to the previous, with a message). The result is the same as a run that never stopped. "
                    "Overrides may extend the search (search.generations=N) or change workers.* (actors, "
                    "GPUs, cluster address); other changes are refused.")
    resume_parser.add_argument("run_dir", help="run directory, e.g. runs/default-s0-20261126-033727")
    resume_parser.add_argument("overrides", nargs="*", metavar="key=value",
                               help="search.generations=N or workers.* overrides")
    resume_parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    resume_parser.set_defaults(handler=_cmd_resume)

    grow_parser = commands.add_parser(
        "grow", help="add members to a finished run without redoing anything",
        description="Evolve more generations from where the search stopped, keep the current members and add "
                    "the best new distinct candidates; metrics, members and the population log are updated.")
    grow_parser.add_argument("run_dir", help="a finished run directory")
    grow_parser.add_argument("--members", type=int, required=True, help="members to add")
    grow_parser.add_argument("--generations", type=int, default=1,
                             help="generations to evolve first (0 = draw from candidates already evaluated)")
    grow_parser.set_defaults(handler=_cmd_grow)

    report_parser = commands.add_parser(
        "report", help="write report.md with tables and PNG plots for a run (or a folder of runs)",
        description="For a run directory: report.md with test metrics, the selection rules compared, fitness "
                    "per generation, accuracy/NLL vs ensemble size, diversity heatmaps, a reliability diagram, "
                    "a feature-visualisation grid and (for density/sigma sweeps) the mutation window, as PNGs "
                    "next to it. For a folder: a report per run and a summary table over all of them.")
    report_parser.add_argument("path", help="run directory, or a folder of run directories")
    report_parser.add_argument("--no-features", action="store_true",
                               help="skip the feature visualisation (the slowest part)")
    report_parser.set_defaults(handler=_cmd_report)

    config_parser = commands.add_parser(
        "config", help="validate a config and print it resolved, or list every field with its doc",
        description="Print the resolved config (defaults filled in) after validation; --fields lists all fields.")
    config_parser.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    config_parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    config_parser.add_argument("--fields", action="store_true", help="list every field, its doc and default")
    config_parser.set_defaults(handler=_cmd_config)


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    """export."""
    export_parser = commands.add_parser(
        "export", help="write a finished run's ensemble as one file that loads without evo_subens",
        description="Write the ensemble (input transform, members, softmax average; any batch size) as a "
                    "TorchScript (torch.jit.load), torch.export (torch.export.load(...).module()) or ONNX "
                    "(onnxruntime) file, or the members' weights with a JSON description as safetensors.")
    export_parser.add_argument("run_dir", help="a finished run directory")
    export_parser.add_argument("--format", required=True, metavar="FORMAT",
                               help="torchscript, pt2, onnx (needs pip install -e '.[export]') or safetensors")
    export_parser.add_argument("--out", default=None, metavar="PATH",
                               help="file to write (default: RUN_DIR/export/ensemble.{pt,pt2,onnx,safetensors}, "
                                    "with --student RUN_DIR/export/student.{...})")
    export_parser.add_argument("--student", action="store_true",
                               help="export the run's distilled student (made by evo-subens distill) instead of "
                                    "the ensemble")
    export_parser.set_defaults(handler=_cmd_export)


def _add_distill_command(commands: argparse._SubParsersAction) -> None:
    """distill."""
    distill_parser = commands.add_parser(
        "distill", help="train one network of the parent's architecture on a finished run's ensemble's outputs",
        description="Train a student (the parent's architecture, from the parent's weights) on the training split "
                    "to match the ensemble's averaged probabilities: loss = alpha * KL(ensemble || student) + "
                    "(1 - alpha) * cross-entropy; SGD one-cycle, the run's seed. Writes RUN_DIR/student/student.pt "
                    "and RUN_DIR/student/metrics.json and prints test accuracy, NLL, ECE and temperature-scaled "
                    "NLL of parent, ensemble and student. evo-subens export RUN_DIR --student exports it.")
    distill_parser.add_argument("run_dir", help="a finished classification run directory")
    distill_parser.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    distill_parser.add_argument("--lr", type=float, default=0.05, help="peak one-cycle learning rate")
    distill_parser.add_argument("--alpha", type=float, default=1.0,
                                help="weight of the soft targets, in [0, 1] (1: soft targets only, 0: true labels "
                                     "only)")
    distill_parser.set_defaults(handler=_cmd_distill)


def _interrupted(args: argparse.Namespace) -> str:
    """The line printed on Ctrl-C: where the run stopped and how to go on."""
    from .core.checkpoint import describe_stop
    from .core.rundir import created_run_dirs

    run_dir = getattr(args, "run_dir", None) if args.command in ("resume", "grow") else None
    if args.command == "run" and created_run_dirs:
        run_dir = created_run_dirs[-1]
    if run_dir is None:
        return "evo-subens: interrupted" + (" before the run directory was created" if args.command == "run" else "")
    return (f"evo-subens: interrupted; {run_dir} stopped {describe_stop(run_dir)}; go on with: "
            f"evo-subens resume {run_dir}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with options and ``key=value`` overrides in any order (argparse alone takes the
    overrides only before the first option)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``evo-subens``; user errors print one line and exit with code 2, Ctrl-C says where
    the run stopped and exits with 130."""
    start_cli_clock(with_process=argv is None)
    args = parse_args(build_parser(), argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"evo-subens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
