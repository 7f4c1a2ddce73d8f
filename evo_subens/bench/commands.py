"""The ``evo-subens bench`` subcommands: their arguments and the handlers that call each benchmark."""

from __future__ import annotations

import argparse

def _cmd_bench(args: argparse.Namespace) -> int:
    from .throughput import throughput

    throughput(models=args.models.split(","), population=args.population,
               actors=[int(a) for a in str(args.actors).split(",")], density=args.density,
               validation_size=args.validation_size, repeats=args.repeats, data_root=args.data_root,
               gpus_per_actor=args.gpus_per_actor,
               populations=[int(p) for p in args.populations.split(",") if p.strip()],
               stock_max_gb=args.stock_max_gb)
    return 0


def _cmd_bench_streaming(args: argparse.Namespace) -> int:
    from .streaming import streaming_bench

    streaming_bench(folder=args.folder, images=args.images, size=args.size,
                    workers=[int(w) for w in args.workers.split(",")], epochs=args.epochs, repeats=args.repeats,
                    batch_size=args.batch_size, model=args.model, augment=args.augment)
    return 0


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from .latency import latency_bench

    latency_bench(args.run_dirs, batches=args.batches, repeats=args.repeats, device=args.device,
                  threads=args.threads, seconds=args.seconds)
    return 0


def _cmd_bench_packed(args: argparse.Namespace) -> int:
    from .packed import packed_bench

    packed_bench(seeds=[int(s) for s in args.seeds.split(",")], config_dirs=args.configs,
                 output_dir=args.output_dir, seconds=args.seconds)
    return 0


def _batch_sizes(text: str) -> list[int]:
    """``--batches``: comma-separated positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 1,256; got {text!r}")
    return sizes


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from .quality import quality

    quality(seeds=[int(s) for s in args.seeds.split(",")], config_dir=args.configs, data_root=args.data_root,
            output_dir=args.output_dir, executor=args.executor)
    return 0


def _cmd_bench_loop(args: argparse.Namespace) -> int:
    from .loop import loop_bench

    loop_bench(seeds=[int(s) for s in args.seeds.split(",")], config_dirs=args.configs, data_root=args.data_root,
               output_dir=args.output_dir, executor=args.executor)
    return 0


def _cmd_bench_prune_tune(args: argparse.Namespace) -> int:
    from .prune_tune import prune_tune

    prune_tune(seeds=[int(s) for s in args.seeds.split(",")], data_root=args.data_root,
               output_dir=args.output_dir, members=args.members, executor=args.executor)
    return 0


def _cmd_bench_stochastic(args: argparse.Namespace) -> int:
    from .stochastic import stochastic

    stochastic(seeds=[int(s) for s in args.seeds.split(",")],
               sparsities=[float(s) for s in args.sparsities.split(",")], members=args.members,
               tune_epochs=args.tune_epochs, num_samples=args.num_samples or None, schedule=args.schedule,
               start=args.start, fraction=args.fraction, data_root=args.data_root, output_dir=args.output_dir,
               executor=args.executor)
    return 0


def _cmd_bench_rl(args: argparse.Namespace) -> int:
    from .rl import rl_bench

    rl_bench(games=args.games.split(","), seeds=[int(s) for s in args.seeds.split(",")], steps=args.steps,
             arms=args.arms.split(","), output_dir=args.output_dir, executor=args.executor)
    return 0


def _cmd_bench_rl_throughput(args: argparse.Namespace) -> int:
    from .rl_throughput import rl_throughput

    rl_throughput(envs=args.envs.split(","), actors=[int(a) for a in args.actors.split(",")],
                  population=args.population, episodes=args.episodes, num_envs=args.num_envs, density=args.density,
                  parent_steps=args.parent_steps, repeats=args.repeats, methods=args.methods.split(","))
    return 0


def _cmd_bench_sparsity(args: argparse.Namespace) -> int:
    from .sparsity import sparsity_table

    sparsity_table(args.config, sparsities=[float(s) for s in args.sparsities.split(",")], members=args.members,
                   tune_epochs=args.tune_epochs, tune_lr=args.tune_lr, seed=args.seed, output_dir=args.output_dir,
                   executor=args.executor, overrides=list(args.overrides))
    return 0


def _add_seeded_bench_options(parser: argparse.ArgumentParser, output_dir: str, executor_help: str) -> None:
    """Options every multi-seed quality benchmark shares: seeds, data, output folder, executor."""
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
    parser.add_argument("--output-dir", default=output_dir, help="where the runs go")
    parser.add_argument("--executor", default="ray", choices=("ray", "local"), help=executor_help)


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    """bench throughput | streaming | latency | packed | prune-tune | stochastic | sparsity | quality | rl."""
    bench_parser = commands.add_parser("bench", help="benchmarks (not tests): throughput, prune-tune, quality, "
                                                  "stochastic")
    bench_commands = bench_parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    throughput_parser = bench_commands.add_parser(
        "throughput", help="candidates/s of the engine vs plain parent forward passes, same data and processes",
        description="Measures, in one run, candidates per second of (a) the engine's Ray evaluation of noisy "
                    "children and (b) plain forward passes of the parent in the same number of Ray actors, on "
                    "Fashion-MNIST validation images, and prints a/b.")
    throughput_parser.add_argument("--models", default="cnn,mlp10m",
                                   help="comma-separated: cnn (~0.1M params), mlp10m (~10M params)")
    throughput_parser.add_argument("--population", type=int, default=32, help="candidates per generation")
    throughput_parser.add_argument("--actors", default="1,2",
                                   help="comma-separated Ray actor counts to compare at (1 torch thread each)")
    throughput_parser.add_argument("--density", type=float, default=0.01, help="mutation density")
    throughput_parser.add_argument("--validation-size", type=int, default=5000, help="validation images")
    throughput_parser.add_argument("--repeats", type=int, default=3, help="timed generations per method")
    throughput_parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
    throughput_parser.add_argument("--gpus-per-actor", type=float, default=0.0,
                                   help="GPUs per actor (e.g. 0.5 with 2 actors on one GPU); 0 = CPU")
    throughput_parser.add_argument("--populations", default="32,128",
                                   help="population sizes of the driver-memory table (empty: none)")
    throughput_parser.add_argument("--stock-max-gb", type=float, default=8.0,
                                   help="skip stock EvoTorch where its population would need more driver memory")
    throughput_parser.set_defaults(handler=_cmd_bench)
    streaming_parser = bench_commands.add_parser(
        "streaming", help="training samples/s of a streamed image folder vs the same folder in memory",
        description="Trains one model from one initialisation on an image folder loaded in memory and streamed "
                    "(DataLoader workers decoding batches), interleaved in one process; prints load seconds, "
                    "median samples/s, the ratio to in memory, and whether the weights are identical.")
    streaming_parser.add_argument("--folder", default=None, help="an image folder (class per sub-folder); "
                                                                 "default: a synthetic one in a temporary folder")
    streaming_parser.add_argument("--images", type=int, default=8000, help="synthetic images")
    streaming_parser.add_argument("--size", type=int, default=64, help="synthetic images' side in pixels")
    streaming_parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    streaming_parser.add_argument("--epochs", type=int, default=1, help="training epochs per measurement")
    streaming_parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    streaming_parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    streaming_parser.add_argument("--model", default="cnn2d", help="registry model (cnn2d, lenet, mlp)")
    streaming_parser.add_argument("--augment", action="store_true", help="random crop and flip in every method")
    streaming_parser.set_defaults(handler=_cmd_bench_streaming)
    latency_parser = bench_commands.add_parser(
        "latency", help="inference latency of a run's ensemble forms (looped, vmapped, packed, student) vs its parent",
        description="Times, interleaved in one process on the same inputs, the parent, the members one after "
                    "another, the members vmapped, the packed network (packed runs) and the distilled student "
                    "(where RUN_DIR/student/student.pt exists), per batch size; prints the median ms per call, "
                    "its interquartile range, the ratio to the parent, parameters and MFLOPs per sample.")
    latency_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    latency_parser.add_argument("--batches", type=_batch_sizes, default=[1, 256],
                                help="comma-separated batch sizes (default 1,256)")
    latency_parser.add_argument("--repeats", type=int, default=None,
                                help="interleaved rounds per batch size (default: as many as fill --seconds)")
    latency_parser.add_argument("--seconds", type=float, default=8.0,
                                help="timing seconds per batch size when --repeats is not given")
    latency_parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models run")
    latency_parser.add_argument("--threads", type=int, default=None,
                                help="torch intra-op threads while timing (default: torch's setting; on a busy "
                                     "shared machine 1 keeps threads from waiting on each other)")
    latency_parser.set_defaults(handler=_cmd_bench_latency)
    packed_parser = bench_commands.add_parser(
        "packed", help="packed ensembles vs their parent: test NLL and accuracy, parameters, latency, students",
        description="Per folder of packed-<M>.yaml configs and per seed: the packed runs (the first trains the "
                    "parent, the others cut theirs from it), each distilled into a student and timed at batch "
                    "256 (one thread); prints test accuracy / NLL of parent, packed ensemble and student, "
                    "parameter and latency ratios to the parent, and whether each run reached the bar.")
    packed_parser.add_argument("--configs", default="configs/study/packed/mnist1d",
                               help="comma-separated folders of packed-<M>.yaml configs")
    packed_parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    packed_parser.add_argument("--output-dir", default="runs/study-packed", help="where the runs go")
    packed_parser.add_argument("--seconds", type=float, default=8.0, help="timing seconds per run")
    packed_parser.set_defaults(handler=_cmd_bench_packed)
    prune_tune_parser = bench_commands.add_parser(
        "prune-tune", help="Prune-and-Tune ensembles vs single model, bagging and dropout at a 16-epoch budget",
        description="The shape of PAT Table 1 on Fashion-MNIST with a LeNet: parent 8 epochs + 8 children "
                    "at 50%% sparsity tuned 1 epoch (random and anti-random), against one model trained 16 "
                    "epochs, bagging (8 x 2 epochs on 90%%) and dropout; mean +- standard error over seeds.")
    _add_seeded_bench_options(prune_tune_parser, "runs/bench-prune-tune", "where children are tuned")
    prune_tune_parser.add_argument("--members", type=int, default=8, help="children / bagged models")
    prune_tune_parser.set_defaults(handler=_cmd_bench_prune_tune)
    stochastic_parser = bench_commands.add_parser(
        "stochastic", help="Stochastic Subnetwork Annealing vs one-shot pruning at high sparsity, same tuning",
        description="Fashion-MNIST, LeNet S, one parent per seed: random-mask children at each sparsity tuned "
                    "with the mask fixed (one-shot) or annealed (stochastic), the same masks, seeds and budget; "
                    "single children and ensembles, mean +- standard error over seeds of accuracy and NLL.")
    _add_seeded_bench_options(stochastic_parser, "runs/bench-stochastic", "where children are tuned")
    stochastic_parser.add_argument("--sparsities", default="0.9,0.98", help="comma-separated sparsities")
    stochastic_parser.add_argument("--members", type=int, default=6, help="children per run (the ensemble)")
    stochastic_parser.add_argument("--tune-epochs", type=int, default=2, help="tuning epochs per child")
    stochastic_parser.add_argument("--num-samples", type=int, default=20000,
                                   help="cap on the training pool (5,000 of it validation); 0 = all 60,000")
    stochastic_parser.add_argument("--schedule", default="cosine", choices=("linear", "cosine", "exponential"),
                                   help="annealing schedule")
    stochastic_parser.add_argument("--start", type=float, default=0.5, help="starting inclusion probability")
    stochastic_parser.add_argument("--fraction", type=float, default=0.5, help="share of tuning that anneals")
    stochastic_parser.set_defaults(handler=_cmd_bench_stochastic)
    rl_parser = bench_commands.add_parser(
        "rl", help="ensemble policies vs their PPO parent on unseen episodes (MinAtar; procgen:<game> too)",
        description="For each game and seed one PPO parent (minatar_cnn; for procgen:<game> nature_cnn on 200 "
                    "training levels) shared by every arm; each arm's ensemble vs the parent on 50 unseen test "
                    "episodes: mean +- standard error over seeds of the test return, its IQM and the ensemble's "
                    "gain, and how often a gated ensemble's members voted.")
    rl_parser.add_argument("--games", default="breakout,space_invaders",
                           help="comma-separated MinAtar games (or procgen:<game>)")
    rl_parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    rl_parser.add_argument("--steps", type=int, default=200_000, help="PPO env steps of each parent")
    rl_parser.add_argument("--arms", default="noisy,pseudo",
                           help="comma-separated: noisy (noisy children, mean rule), pseudo (final-layer noise, "
                                "entropy-gated vote), pseudo@T (the same with gate threshold T, e.g. pseudo@0.5)")
    rl_parser.add_argument("--output-dir", default="runs/bench-rl", help="where the runs go")
    rl_parser.add_argument("--executor", default="ray", choices=("ray", "local"), help="where candidates are scored")
    rl_parser.set_defaults(handler=_cmd_bench_rl)
    rl_throughput_parser = bench_commands.add_parser(
        "rl-throughput", help="candidate evaluation in env steps/s: the engine vs its limit and stock EvoTorch",
        description="Trains a small PPO parent per environment, then scores a generation of noisy children in "
                    "Ray actors: env steps/s of the engine, of the parent's own episodes in the same actors (the "
                    "limit), and of EvoTorch's GymNE and VecGymNE with the same policy network.")
    rl_throughput_parser.add_argument("--envs", default="CartPole-v1,minatar:breakout",
                                      help="comma-separated env ids (gymnasium, minatar:<game>, procgen:<game>)")
    rl_throughput_parser.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    rl_throughput_parser.add_argument("--population", type=int, default=16, help="candidates per generation")
    rl_throughput_parser.add_argument("--episodes", type=int, default=8, help="validation episodes per candidate")
    rl_throughput_parser.add_argument("--num-envs", type=int, default=8,
                                      help="episodes an engine actor plays side by side")
    rl_throughput_parser.add_argument("--density", type=float, default=0.1, help="share of weights perturbed")
    rl_throughput_parser.add_argument("--parent-steps", type=int, default=20_000, help="PPO steps of the parent")
    rl_throughput_parser.add_argument("--repeats", type=int, default=3, help="timed generations per method")
    rl_throughput_parser.add_argument("--methods", default="limit,engine,stock GymNE,stock VecGymNE",
                                      help="comma-separated methods to run")
    rl_throughput_parser.set_defaults(handler=_cmd_bench_rl_throughput)
    sparsity_parser = bench_commands.add_parser(
        "sparsity", help="how much sparsity a model affords: tuned random-mask children vs their parent",
        description="Trains the config's parent once, tunes --members random-mask children (connections, global) "
                    "at each sparsity for --tune-epochs one-cycle epochs with the mask fixed, and prints test "
                    "accuracy and NLL of the parent, the mean child and their ensemble, and the largest sparsity "
                    "whose children stay within half a point of the parent's accuracy.")
    sparsity_parser.add_argument("config", help="YAML config: its data, model and parent training are used")
    sparsity_parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    sparsity_parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.5", help="comma-separated sparsities")
    sparsity_parser.add_argument("--members", type=int, default=4, help="children per sparsity")
    sparsity_parser.add_argument("--tune-epochs", type=int, default=3, help="tuning epochs per child")
    sparsity_parser.add_argument("--tune-lr", type=float, default=0.05, help="peak one-cycle learning rate")
    sparsity_parser.add_argument("--seed", type=int, default=0, help="run seed")
    sparsity_parser.add_argument("--output-dir", default="runs/bench-sparsity", help="where the runs go")
    sparsity_parser.add_argument("--executor", default="local", choices=("ray", "local"),
                                 help="where children are tuned")
    sparsity_parser.set_defaults(handler=_cmd_bench_sparsity)
    quality_parser = bench_commands.add_parser(
        "quality", help="the study: every family vs its parent and matched-budget baselines, per dataset",
        description="Runs every config of each folder in --configs (one folder per dataset and model under "
                    "configs/study/: the child families, one model at the matched budget, deep ensemble, bagging, "
                    "MC dropout, snapshot ensemble, FGE, and a deep ensemble at N x the budget) for each seed and "
                    "prints per folder mean +- standard error over seeds of accuracy, NLL and ECE (raw and "
                    "temperature-scaled), disagreement, how many seeds beat the parent, epochs and wall seconds. "
                    "Finished runs are read back, so an interrupted study goes on where it stopped.")
    _add_seeded_bench_options(quality_parser, "runs/study", "where the subnetwork runs evaluate candidates")
    quality_parser.add_argument("--configs", default="configs/study/mnist1d,configs/study/digits",
                                help="comma-separated folders of YAML configs, one config per method")
    quality_parser.set_defaults(handler=_cmd_bench_quality)
    loop_parser = bench_commands.add_parser(
        "loop", help="the population loop against simple arms at the same training budget",
        description="Runs every config of each folder in --configs (one folder per dataset: loop.yaml, the loop "
                    "under test, and the arms it must beat at the same budget in epochs) for each seed and prints "
                    "per folder mean +- standard error of test accuracy, test NLL and held-back validation NLL, "
                    "and each arm's paired difference from the loop. Finished runs are read back.")
    _add_seeded_bench_options(loop_parser, "runs/bench-loop", "where candidates are tuned and scored")
    loop_parser.add_argument("--configs", default="configs/study/loop/mnist1d",
                             help="comma-separated folders of YAML configs, one per arm, loop.yaml among them")
    loop_parser.set_defaults(handler=_cmd_bench_loop)
