"""The ``fmtl-edge`` command line: ``simulate``, ``report``, ``info``, ``meter``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2

SIMULATE_HELP = """\
Train several federated tasks at once over a pool of simulated clients, with MAS (merge and split)
and its baselines, and compare total test loss, device time and energy per method.

Methods (--methods, comma separated):
{methods}

Clients that hold only some tasks (seed 000's client groups): --task-groups N gives each client one
of the first N tasks; --sampling per-group then draws K clients from each task's group per round.

Datasets (--dataset):
  digits       scikit-learn's bundled 8x8 digits (no download; the default): digit, parity, ge5,
               reconstruct, edges; 8 clients, Dirichlet(0.5) over the digit
  utkface      a UTKFace image folder (--data-dir .../utkface/images): age, age_group, gender, race,
               autoencode, edges, keypoints; 32 clients, Dirichlet over race
  uci-har      UCI HAR per-subject arrays (--data-dir .../uci_har): one client per subject
  npz          your own data: a folder of client_<id>.npz files and a tasks.toml (see docs/data.md)

Settings come from built-in defaults < the dataset's preset < --config FILE.toml < flags.

examples:
  fmtl-edge simulate                                   # digits, mas-2,all-in-one,one-by-one
  fmtl-edge simulate --dataset utkface --data-dir ../shared/data/utkface/images \\
      --methods mas-2,mas-3,all-in-one,one-by-one --rounds 30 --out runs/utk
  fmtl-edge simulate --config job.toml --seed 3       # flags override the file
"""


def _simulate_help() -> str:
    from fmtl_edge.methods import methods_help

    return SIMULATE_HELP.replace("{methods}", methods_help())


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate", help="train FL tasks with MAS and baselines over simulated clients",
        description=_simulate_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits | utkface | uci-har | npz (default: digits)")
    g.add_argument("--data-dir", help="folder of the data set (utkface images, uci_har, npz folder)")
    g.add_argument("--clients", type=int, help="number of clients (default: the dataset's)")
    g.add_argument("--max-samples", type=int, help="use at most this many samples (quick runs)")
    g.add_argument("--image-size", type=int, help="resize images to S×S pixels (utkface; default 64)")
    g.add_argument("--alpha", type=float, help="Dirichlet concentration of the non-IID split")
    g.add_argument("--classes-per-client", type=int, metavar="C",
                   help="pathological split instead of Dirichlet: every client holds exactly C classes "
                        "(digits: of the digit; utkface: of race), e.g. --clients 10 --classes-per-client 2")
    g = p.add_argument_group("federated training")
    g.add_argument("--tasks", metavar="TASK,TASK,...", help="train only these tasks of the data set (default: all)")
    g.add_argument("--methods", help="comma list (default: mas-2,all-in-one,one-by-one)")
    g.add_argument("--rounds", type=int, help="R, rounds per task (preset: 30; paper: 100)")
    g.add_argument("--r0", type=int, help="R0, rounds of MAS's merged phase (default: R/3; mas-auto: its cap)")
    g.add_argument("--clients-per-round", type=int, help="K, clients sampled per round (default 4)")
    g.add_argument("--local-epochs", type=int, help="E, local epochs per round (default 1)")
    g.add_argument("--batch-size", type=int, help="samples per SGD step (default: preset)")
    g.add_argument("--lr", type=float, help="base learning rate, poly-decayed per round (default 0.1)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="weight decay (default 1e-4)")
    g.add_argument("--affinity-every", type=int, help="ρ, measure task affinity every ρ batches (default 5)")
    g.add_argument("--affinity-divide-by-lr", action="store_const", const=True,
                   help="divide affinities by η as TAG does (off by default)")
    g.add_argument("--aggregator", help="fedavg | median | trimmed-mean: how the default strategy combines "
                   "updates (default fedavg; the robust ones hold the round's K updates)")
    g.add_argument("--trim-fraction", type=float, help="β of --aggregator trimmed-mean (default 0.1)")
    g.add_argument("--sampling", help="uniform | per-group | all: who trains in a round (default: per-group "
                   "with --task-groups, else uniform K)")
    g.add_argument("--task-groups", type=int, help="give each client one of the first N tasks (its other "
                   "labels dropped): seed 000's client groups")
    g.add_argument("--layers", action="append", metavar="KIND=PATTERN[,PATTERN]",
                   help="layered: layer types by glob over parameter names; KIND is pretrained | common | task | "
                   "personal (repeatable; e.g. --layers personal='heads.*')")
    g.add_argument("--pretrained", metavar="FILE.safetensors", help="layered: load the pretrained layers "
                   "(default backbone.*) from a model file of an earlier run and freeze them")
    g.add_argument("--dropout", type=float, metavar="P", help="fault injection: each sampled client fails "
                   "mid-round with probability P, seeded by (seed, job, round, client) (default 0)")
    g.add_argument("--eval-every", type=int, metavar="N", help="test-loss curves: evaluate every job's global "
                   "model on the union test set every N rounds and at the job's end (results: methods.<m>.curve; "
                   "not counted in device time; default 0: off)")
    g.add_argument("--loss-weights", metavar="uniform|chance|TASK=W,...",
                   help="task weights of the objective Σ w_t·L_t: uniform (w = 1, default), chance (w_t = 1 / the "
                        "loss of the best constant predictor of t's training labels, from per-client label "
                        "statistics), or given (e.g. age=1,gender=0.5); results also give each task's chance loss "
                        "and the normalised total (chance level = 1 per task)")
    g.add_argument("--partition-seed", type=int, metavar="S",
                   help="seed of the data partition when it differs from --seed: run one seed of a --seeds study as "
                        "its own resumable run, then combine the runs with `fmtl-edge report RUN RUN ...`")
    g.add_argument("--oracle-splits", action="store_const", const=True,
                   help="beside every mas-x, mas-oracle-x: the same merge, then every x-split trained from the merged "
                        "weights; reports the rank of the affinity-chosen split by test loss (MAS Table 1's check; "
                        "small n only)")
    g.add_argument("--paired-with", metavar="METHOD",
                   help="with --seeds: each method's per-seed differences against METHOD (normalised and raw total "
                        "test loss), their mean and 95%% t-interval (n-1 degrees of freedom), in results, table and plots")
    g = p.add_argument_group("model (fmtl-edge models lists the built-ins with their size and FLOPs)")
    g.add_argument("--model", metavar="FAMILY|MODULE:FUNCTION|FILE.py:FUNCTION",
                   help="the network: auto (default: a small conv for images, an MLP for vectors), conv, mlp, "
                   "resnet (BasicBlocks), mobilenet (inverted residuals), or your factory "
                   "function(input_shape, tasks) returning a module with .backbone and .heads "
                   "(an nn.ModuleDict, one head per task name); see README 'Your own network'")
    g.add_argument("--width", type=int, help="backbone width: channels of the first stage, or the MLP's size "
                   "(default 16)")
    g.add_argument("--depth", type=int, help="blocks per stage of conv/resnet/mobilenet (MLP: hidden layers - 1; "
                   "default 1)")
    g.add_argument("--head-hidden", type=int, metavar="UNITS", help="a hidden layer of this many units in the "
                   "built-in families' classification/binary/regression heads (default 0: linear heads)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help="run seed (default 0)")
    g.add_argument("--seeds", metavar="S,S,...", help="run every method once per training seed (e.g. 0,1,2: "
                   "model init, sampling, batch order); the data partition stays --seed's; results hold "
                   "each seed's figures and mean/std (ddof=1); not resumable")
    from fmtl_edge.methods import method_options

    g = p.add_argument_group("method options (each method's own settings)")
    for o in method_options().values():
        g.add_argument(o.flag, dest=o.name, type=o.kind, choices=o.choices or None, help=o.help)
    g = p.add_argument_group("device and output")
    g.add_argument("--device", help="cpu | cuda | cuda:N (default cpu)")
    g.add_argument("--meter", help="energy meter: auto | jetson | nvml | rapl | estimate | null (default: the "
                   "profile's, auto: the first that reads, else a labelled CPU-time estimate)")
    g.add_argument("--profile", help="device profile: a TOML file or a device class (jetson-nano, jetson-orin-nano, "
                   "workstation, ...; default: detected) giving memory/round budgets and the meter")
    g.add_argument("--threads", metavar="N|auto",
                   help="intra-op threads of each client execution (default auto: one per 0.5 GFLOP of a training "
                        "batch, at most the usable cores; the OpenMP wait policy is passive unless you set "
                        "OMP_WAIT_POLICY), so device seconds measure the work even on shared cores")
    g.add_argument("--fleet", metavar="FILE.toml|NAME",
                   help="simulated devices (e.g. orin-mix: Orin Nano, Orin NX, AGX Orin x 8, their power modes): client "
                        "k runs on device k mod N; device seconds and joules are the fleet model's for the counted "
                        "sample-passes (labelled model:fleet: deterministic on a loaded machine)")
    g.add_argument("--selection", choices=("uniform", "energy", "utility"),
                   help="who trains in a round: uniform (default), energy (the K of least predicted joules whose "
                        "budgets allow the round), utility (Oort: statistical utility x system cost)")
    g.add_argument("--energy-candidates", type=int, metavar="D",
                   help="--selection energy takes its K clients among D drawn uniformly each round (seeded; e.g. 2K), "
                        "so every client keeps a chance to train; default: among all (greedy: the same cheapest "
                        "clients every round)")
    g.add_argument("--power-mode", choices=("keep", "max", "auto"),
                   help="each selected device's power mode: keep (default), max, auto (the least J per sample that "
                        "still meets the round's deadline = the slowest device at max); needs --fleet or devices "
                        "that report their modes")
    g.add_argument("--time-budget-s", type=float, help="per-round time budget of a client execution (s)")
    g.add_argument("--energy-budget-j", type=float, help="per-round energy budget of a client execution (J)")
    g.add_argument("--out", help="output folder (default: a new runs/<UTC time>, with runs/latest pointing at it)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out (refused otherwise)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run of --out (Ctrl-C, kill, crash) "
                   "from its finished methods and last completed round, with the same settings; without --out "
                   "the most recent interrupted run under runs/")
    g.add_argument("--lease-wait-s", type=float, help="wait at most this long for the device lease held by another "
                   "process (default 600; 0: fail at once); a wait over 2 s is logged with the holder's pid")
    g.add_argument("--config", help="TOML file with the same keys as these flags")
    g.add_argument("--no-progress", action="store_true", help="no progress bars: one log line per round (logs, CI)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug log messages (same as --log-level debug)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="log messages on stderr from this level (default info)")
    g.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")
    p.set_defaults(func=cmd_simulate)


_CONFIG_KEYS = (
    "dataset", "data_dir", "tasks", "clients", "max_samples", "image_size", "alpha", "classes_per_client", "methods", "rounds", "r0",
    "clients_per_round", "local_epochs", "batch_size", "lr", "momentum", "weight_decay", "affinity_every",
    "affinity_divide_by_lr", "width", "depth", "model", "head_hidden", "seed", "seeds", "device", "meter", "time_budget_s",
    "energy_budget_j", "out", "profile", "aggregator", "trim_fraction", "sampling", "task_groups", "layers",
    "pretrained", "lease_wait_s", "dropout", "eval_every", "threads", "loss_weights", "paired_with", "partition_seed",
    "oracle_splits", "fleet", "selection", "power_mode", "energy_candidates",
)


def _parse_layers(items: list[str] | None) -> dict[str, list[str]] | None:
    """``["personal=heads.*", "pretrained=backbone.layers.0.*,backbone.layers.1.*"]`` → kind → patterns.

    Raises:
        ConfigError: an item without ``KIND=``.
    """
    if not items:
        return None
    from fmtl_edge.config import ConfigError

    out: dict[str, list[str]] = {}
    for item in items:
        kind, sep, pats = item.partition("=")
        if not sep or not pats:
            raise ConfigError("--layers", f"{item!r} is not KIND=PATTERN (e.g. personal='heads.*')")
        out.setdefault(kind.strip(), []).extend(p.strip() for p in pats.split(",") if p.strip())
    return out


def _setup_logging(level: str | None, console=None) -> None:
    """Log records of ``fmtl_edge.*`` to stderr (through ``console`` while progress bars run, so
    warnings print above them); replaces the handler an earlier call installed."""
    logger = logging.getLogger("fmtl_edge")
    for h in [h for h in logger.handlers if getattr(h, "_fmtl_cli", False)]:
        logger.removeHandler(h)
    if console is not None:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._fmtl_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, (level or "info").upper()))


def _log_hooks(log: logging.Logger):
    """The runner's hooks writing one log line per round (``--no-progress``)."""
    from fmtl_edge.runner import RunHooks


    def start(method):
        log.info("%s: starting, %d rounds planned", method.name, method.planned_rounds())

    def on_round(method, rec):
        e = "" if rec.energy_j is None else f", {rec.energy_j:.1f} J"
        log.info("%s %s round %d: train loss %.4f, %d clients, %d samples, lr %.4g, %.2f device s%s",
                 method.name, rec.job, rec.round + 1, sum(rec.train_loss.values()), len(rec.clients), rec.samples,
                 rec.lr, rec.device_s, e)

    def end(method, entry):
        from fmtl_edge.report import loss_summary

        log.info("%s: done, %s, %.1f device s", method.name, loss_summary(entry), entry["device_s"])

    return RunHooks(on_method_start=start, on_round=on_round, on_method_end=end)


def _err(prog: str, msg: str) -> int:
    print(f"fmtl-edge {prog}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fmtl_edge.config import ConfigError, build_config
    from fmtl_edge.data.base import DataError
    from fmtl_edge.runtime import MeterUnavailable

    console = Console(stderr=True)
    _setup_logging("debug" if args.verbose else args.log_level, None if args.no_progress else console)
    log = logging.getLogger("fmtl_edge.simulate")
    try:
        from fmtl_edge.methods import method_options

        flags = {k: getattr(args, k) for k in _CONFIG_KEYS}
        flags["layers"] = _parse_layers(args.layers)
        flags["method_options"] = {k: getattr(args, k) for k in method_options() if getattr(args, k, None) is not None}
        cfg = build_config(flags, args.config)
        from fmtl_edge.config import check_device
        from fmtl_edge.report import check_out_dir, new_run_dir

        check_device(cfg.device)
        from fmtl_edge.run_state import RunState, has_state, latest_interrupted, state_dir

        timestamped = cfg.out is None
        overwrite = args.overwrite
        resume_state = None
        if timestamped and args.resume:
            found = latest_interrupted("runs")
            if found is None:
                raise ConfigError("--resume", "no interrupted run under runs/ to resume; name its folder with --out")
            cfg.out = str(found)
        elif timestamped:
            cfg.out = str(new_run_dir())
        if args.resume and cfg.seeds:
            raise ConfigError("--resume", "a --seeds run keeps no run state and cannot be resumed; run it again")
        if args.resume:
            resume_state = RunState.open(cfg.out, cfg)  # the same settings, or rc 2
            overwrite = overwrite or resume_state.overwrite
        elif has_state(cfg.out) and not args.overwrite:
            raise ConfigError("--out", f"an interrupted run is there ({state_dir(cfg.out)}): add --resume, "
                              "or --overwrite to start again")
        check_out_dir(cfg.out, overwrite=overwrite)
        from fmtl_edge.data import load_dataset

        with console.status(f"loading {cfg.dataset}…", spinner="dots") if not args.no_progress else _null():
            dataset = load_dataset(cfg.dataset, cfg.data_options())
        if cfg.tasks:
            dataset = dataset.with_tasks(cfg.tasks)
        cfg.validate_against(len(dataset.tasks), dataset.n_clients)
        from fmtl_edge.runner import prepare_methods
        from fmtl_edge.simulation import dataset_eligible

        names = [m.name for m in prepare_methods(cfg, dataset.tasks, cfg.model_spec(dataset.input_shape),
                                                 dataset_eligible(dataset))]
        if cfg.power_mode != "keep" and cfg.fleet is None:
            raise ConfigError("--power-mode", f"{cfg.power_mode}: simulated clients have no power modes; give "
                              "--fleet (e.g. orin-mix) to simulate devices that do")
        from fmtl_edge.runtime import load_profile

        load_profile(cfg.profile)
        if cfg.meter not in (None, "auto", "estimate", "null"):
            from fmtl_edge.runtime import make_meter

            make_meter(cfg.meter)  # probe now: a meter that cannot read is a usage error
    except MeterUnavailable as e:
        return _err("simulate", f"--meter: {e}")
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        return _err("simulate", str(e))

    from fmtl_edge.report import loss_summary, summary_tables, write_outputs
    from fmtl_edge.runner import RunHooks
    from fmtl_edge.simulation import run_simulation

    console.print(
        f"[bold]{dataset.name}[/]: {len(dataset.tasks)} tasks ({', '.join(dataset.tasks.names)}), "
        f"{dataset.n_clients} clients, K={cfg.clients_per_round}, R={cfg.rounds}, R0={cfg.r0}, "
        f"methods {', '.join(cfg.methods)}"
    )
    hooks = _log_hooks(log)

    def log_resumed(method, rounds_done, entry):
        if entry is not None:
            log.info("%s: finished before the interruption, %s", method.name, loss_summary(entry))

    hooks.on_method_resume = log_resumed
    if resume_state is not None:
        console.print(f"resuming {cfg.out}: {resume_state.summary()}")
    progress = None
    if not args.no_progress:
        progress = make_progress(console, names)
        bars: dict[str, int] = {}

        def start(method):
            bars[method.name] = progress.add_task(method.name, total=method.planned_rounds(), info="")

        def on_round(method, rec):
            progress.update(bars[method.name], advance=1, info=round_info(rec))

        def end(method, entry):
            progress.update(bars[method.name], info=short_loss(entry))

        def resumed(method, rounds_done, entry):
            if method.name not in bars:
                start(method)
            progress.update(bars[method.name], completed=rounds_done,
                            info=(short_loss(entry) + " (before)") if entry else "resumed")

        hooks = RunHooks(on_method_start=start, on_round=on_round, on_method_end=end, on_method_resume=resumed)
    run_state = None
    resume_hint = "run the same command with --resume" + (f" --out {cfg.out}" if timestamped else "")
    previous_term = _stop_on_sigterm()
    try:
        from fmtl_edge.run_state import RunState

        if cfg.seeds:  # one run per seed on the same partition; no run state (not resumable)
            from fmtl_edge.simulation import run_seeds

            if progress is not None:
                with progress:
                    results, models = run_seeds(cfg, dataset, hooks)
            else:
                results, models = run_seeds(cfg, dataset, hooks)
        else:
            run_state = resume_state or RunState.create(cfg.out, cfg, overwrite)
            if progress is not None:
                with progress:
                    results, models = run_simulation(cfg, dataset, hooks=hooks, run_state=run_state)
            else:
                results, models = run_simulation(cfg, dataset, hooks=hooks, run_state=run_state)
        out = write_outputs(cfg.out, results, models, dataset.tasks, cfg.model_spec(dataset.input_shape),
                            overwrite=overwrite)
        if run_state is not None:
            run_state.remove()
        if timestamped:
            from fmtl_edge.report import link_latest

            link_latest(out)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated): the run state is kept either way
        what, rc = ("terminated", 128 + 15) if isinstance(e, Terminated) else ("interrupted", 130)
        if run_state is None:
            console.print(f"[red]{what}: nothing was written[/]")
        else:
            console.print(f"[red]{what}[/]: kept {run_state.summary()} in {run_state.dir}; "
                          f"to continue, {resume_hint}")
        return rc
    except (ConfigError, DataError, ValueError) as e:
        return _err("simulate", str(e))
    except RuntimeError as e:  # a round no client could run (budgets, busy device): no result written
        kept = "" if run_state is None else f"; the completed rounds are kept ({resume_hint} to continue)"
        print(f"fmtl-edge simulate: failed: {e}; no result was written{kept}", file=sys.stderr)
        return 1
    finally:
        _restore_sigterm(previous_term)
    if args.json:
        print((out / "results.json").read_text())
    else:
        for table in summary_tables(results):
            Console().print(table)
        console.print(f"results: {out / 'results.json'}  models: {out / 'models'}")
    return 0


#: width of the progress bars: fixed, so the bar stays readable at 80 columns (the info column
#: takes what is left and wraps, it is never cut)
BAR_WIDTH = 20


def make_progress(console, names=()):
    """The progress display of ``simulate``: per method its name (as wide as the longest of
    ``names``), a :data:`BAR_WIDTH` bar, rounds done/planned, a short info text (job, round, train
    loss; at the end the test loss) and the elapsed time. At 80 columns the bar keeps its width and
    the info wraps rather than the bar shrinking to nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    width = max([len(n) for n in names] + [10])
    return Progress(TextColumn("{task.description}", table_column=Column(min_width=width, no_wrap=True)),
                    BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}", table_column=Column(ratio=1, overflow="fold")),
                    TimeElapsedColumn(), console=console, expand=True)


def round_info(rec) -> str:
    """A progress bar's info after a round: ``merge r3 loss 1.234`` (train loss, Σ over tasks)."""
    return f"{rec.job} r{rec.round + 1} loss {sum(rec.train_loss.values()):.3f}"


def short_loss(entry) -> str:
    """A progress bar's info at a method's end: ``test 0.253`` / ``pers. 0.198`` (total test losses)."""
    parts = [f"{label} {entry[k]:.3f}" for k, label in (("total_test_loss", "test"),
                                                         ("personalised_total_test_loss", "pers."))
             if entry.get(k) is not None]
    return ", ".join(parts) or "no test loss"


class Terminated(KeyboardInterrupt):
    """SIGTERM during ``simulate``: handled as Ctrl-C (the run state is kept for ``--resume``), but
    named "terminated" and exiting 143."""


def _stop_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the handler it replaced
    (None when signals cannot be set here, e.g. outside the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _null():
    from contextlib import nullcontext

    return nullcontext()


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fmtl_edge.report import summary_tables

    docs = []
    for given in args.results:
        p = Path(given)
        if p.is_dir():
            p = p / "results.json"
        try:
            docs.append(json.loads(p.read_text()))
        except FileNotFoundError:
            return _err("report", f"no results file at {p}; pass a results.json or the --out folder of a run")
        except json.JSONDecodeError as e:
            return _err("report", f"{p} is not an fmtl-edge results.json ({e})")
    try:
        if len(docs) > 1:
            from fmtl_edge.results import combine_runs

            results = combine_runs(docs, args.paired_with)
        elif args.paired_with:
            return _err("report", "--paired-with: give the single-seed runs to combine (RUN RUN ...), or run "
                        "simulate with --seeds and --paired-with")
        else:
            results = docs[0]
        tables = summary_tables(results)
    except ValueError as e:
        return _err("report", str(e))
    except KeyError as e:
        return _err("report", f"not an fmtl-edge results.json (no {e})")
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps(results, indent=2))
    for table in tables:
        Console().print(table)
    if args.plot:
        from fmtl_edge.plots import plot_results

        try:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)  # a new figures/ folder is fine
            out = plot_results(results, args.plot)
        except ImportError as e:
            return _err("report", f"--plot: {e}")
        except (OSError, ValueError) as e:  # unwritable place, a file where a folder should be, bad extension
            return _err("report", f"--plot {args.plot}: cannot write the figure ({e})")
        Console(stderr=True).print(f"figure: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmtl-edge",
        description="Energy-aware federated multi-task learning on Jetson-class edge devices.",
        epilog="Run `fmtl-edge <command> --help` for each command's options.",
    )
    from fmtl_edge import __version__

    parser.add_argument("--version", action="version", version=f"fmtl-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    _add_simulate(sub)
    rp = sub.add_parser("report", help="print the summary table (and a figure) of a finished run",
                        description="Print the summary tables of a run's results.json; --plot draws a figure.",
                        epilog="example: fmtl-edge report runs/latest --plot runs/latest/summary.png")
    rp.add_argument("results", nargs="+", help="results.json or the run's --out folder; several single-seed runs "
                    "of one study (simulate --seed S --partition-seed P) are combined as --seeds would (mean ± std)")
    rp.add_argument("--paired-with", metavar="METHOD", help="with several runs: paired per-seed differences "
                    "against METHOD, their mean and 95%% t-interval")
    rp.add_argument("--write", metavar="FILE.json", help="also write the (combined) results document here")
    rp.add_argument("--plot", metavar="FILE.png", help="also draw loss vs device time, energy per method and "
                    "the task-affinity matrix (needs matplotlib)")
    rp.set_defaults(func=cmd_report)
    for module in ("fmtl_edge.backbones.cli", "fmtl_edge.runtime.cli", "fmtl_edge.transport.cli", "fmtl_edge.deploy.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue  # that part is not installed in this build
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:  # `fmtl-edge info --json | head`: the reader left; end quietly like `cat`
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 128 + 13  # as if killed by SIGPIPE
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
