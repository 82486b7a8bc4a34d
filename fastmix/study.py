"""Accuracy study: AutoMix against Mixup, CutMix and vanilla on one trainer, over seeds.

    python bench/accuracy.py                  # the CPU protocol (make study): ~80 min on 2 cores
    python bench/accuracy.py --methods manifoldmix,saliencymix,fmix,resizemix,gridmix,smoothmix,puzzlemix \
        --out runs/study-methods              # the other methods of the paper's tables, same protocol
    python bench/accuracy.py --preset cifar100-r18 --data-dir DATA --epochs 400 \\
        --train-subset 0 --val-split 0 --eval-every 1   # the paper's CIFAR-100 setting (GPU)

Installed, ``fastmix-study`` is the same command (``bench/accuracy.py`` in a source checkout).

Every (method, seed) is one ``train.py`` run in ``OUT/<method>/seed<k>/``. The grid resumes: a
run with a ``summary.json`` is skipped, a run with a ``last.pt`` continues from it (checkpoints
are written at the end of every epoch), any other starts afresh. A run folder remembers the
command line that made it (``study_run.json``) and is never continued with another one.

Then the study aggregates (``--aggregate-only`` does only that):
- ``OUT/results.json`` and ``OUT/results.md``: per method, the final and the median-of-last-10
  test top-1 of the reported head, mean ± std over seeds (sample std), every AutoMix head,
  images/s and wall time per run;
- ``OUT/curves.png``: test top-1 against epoch per method (mean line, min-max band over seeds);
- ``OUT/automix_masks.png``: the trained Mix Block's masks on test images.

The reported head is chosen **on the validation split** (``--val-split`` images carved from the
training set, class-balanced, the same for every seed): the head with the best median validation
top-1 over the last 10 epochs. Without a validation split it is the model's inference head
(``one_k`` for AutoMix, the only head for the baselines). The test split is read only for the
numbers reported. (The authors' own summary script picks the best of the four heads on the test
split; that number, ``best_test_head``, is shown separately and labelled as such.)

``--ema`` gives every method but AutoMix an EMA copy of its network on AutoMix's schedule
(``train.py --ema``), and the tables set each method's online head beside its EMA head (for
AutoMix: the online encoder's heads one_q/mix_q beside the momentum encoder's one_k/mix_k, each
pair chosen on the validation split).

``results.json`` records the commit, the command, the package versions and the machine that
made it, and no absolute path: run folders are relative to it. ``OUT/runs/<method>-seed<k>.json``
holds each run's summary and per-epoch metrics. ``--check-against OLD/results.json`` compares
every run's numbers with a committed grid's and fails on any difference (regeneration).

The children run in their own process group and get SIGTERM if the driver dies, even by
``kill -9`` (``PR_SET_PDEATHSIG``): the run checkpoints and stops, and the next grid resumes it.
"""
import argparse
import ctypes
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

from fastmix.provenance import environment, source_root


# In a checkout, every run is ``python ROOT/train.py`` in ROOT and the results name ROOT's
# commit; installed, a run is ``python -m fastmix.train_cli`` in the current folder.
ROOT = source_root()

# The CPU protocol, fixed before the grid ran (README, *Results*): a fixed class-balanced
# 2,000-image subset of Fashion-MNIST's training set, trained for 200 epochs (4,000 steps of 100),
# where plain training memorises it (a pilot on the validation split: vanilla's training loss
# 0.03 at the end); a class-balanced 2,000-image validation split held out of the rest; the whole
# 10k test set; the cpu-small preset's quarter-width ResNet-10; each method's own recipe otherwise.
CPU_PROTOCOL = dict(preset="cpu-small", methods="automix,mixup,cutmix,vanilla", seeds="0,1,2",
                    epochs=200, train_subset=2000, val_split=2000, eval_every=10)
# Per-method recipe where the spec gives one (spec §3, §4.2): AutoMix's lr anneals to 0.05 with
# the Mix Block in the same group, the baselines' to 0; α: AutoMix 2, Mixup 1, CutMix 0.2 (the
# CIFAR R-18 table). These go after the preset and before --train-args.
METHOD_ARGS = {"automix": ["--min-lr", "0.05"], "mixup": ["--min-lr", "0"],
               "cutmix": ["--min-lr", "0"], "vanilla": ["--min-lr", "0"]}
# The other methods of the paper's tables (fastmix.mixes) on the baselines' recipe (cosine to 0,
# each its own α from config.DEFAULT_ALPHA): selectable with --methods, not in the default grid
# (the published CPU study predates them).
METHOD_ARGS.update({m: ["--min-lr", "0"] for m in ("manifoldmix", "saliencymix", "fmix",
                                                   "resizemix", "gridmix", "smoothmix",
                                                   "puzzlemix")})
WINDOW = 10  # median of the last 10 evaluated epochs (spec §2.4, §6.10)


def parse_args(argv=None):
    """The study's settings from ``argv`` (default ``sys.argv[1:]``), checked before any work
    (argparse's usage and exit status 2 for a bad one)."""
    d = CPU_PROTOCOL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=d["methods"], help="comma-separated (default %(default)s)")
    p.add_argument("--seeds", default=d["seeds"], help="comma-separated (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--train-subset", type=int, default=d["train_subset"],
                   help="class-balanced training subset (0: the whole training set)")
    p.add_argument("--val-split", type=int, default=d["val_split"],
                   help="validation images held out of the training set (0: none)")
    p.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="evaluate the test split every N epochs (and each of the last 10)")
    p.add_argument("--preset", default=d["preset"], help="train.py preset (default %(default)s)")
    p.add_argument("--data-dir", help="dataset folder (train.py --data-dir)")
    p.add_argument("--out", default="runs/study", help="study folder (default %(default)s)")
    p.add_argument("--train-args", default="", help="further train.py flags for every run, one string")
    p.add_argument("--alpha", default="", help="per-method Beta(α, α), e.g. 'cutmix=1,mixup=1' "
                   "(the spec's Tiny-ImageNet values); default: each method's CIFAR α")
    p.add_argument("--dataset", help="train.py --dataset for every run (default: the preset's), "
                   "e.g. fashion-mnist-offcentre")
    p.add_argument("--ema", action="store_true", help="give every method but AutoMix an EMA head "
                   "on AutoMix's schedule (train.py --ema)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run "
                   "(OMP_NUM_THREADS; 0: torch's default)")
    p.add_argument("--check-against", help="a committed results.json: fail unless every run of "
                   "this grid has the same numbers")
    p.add_argument("--aggregate-only", action="store_true", help="only aggregate the runs present")
    p.add_argument("--no-masks", action="store_true", help="skip automix_masks.png")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    try:
        args.alpha = {m: float(a) for m, a in (kv.split("=") for kv in args.alpha.split(",") if kv)}
    except ValueError:
        p.error(f"--alpha takes method=value pairs, e.g. cutmix=1,mixup=1; got {args.alpha!r}")
    if any(m not in METHOD_ARGS or a <= 0 for m, a in args.alpha.items()):
        p.error(f"--alpha: methods from {', '.join(METHOD_ARGS)} with a positive α")
    bad = [m for m in args.methods if m not in METHOD_ARGS]
    if bad or not args.methods or not args.seeds:
        p.error(f"--methods from {', '.join(METHOD_ARGS)} and at least one seed (got {bad or 'none'})")
    if args.epochs <= 0 or args.eval_every <= 0 or args.train_subset < 0 or args.val_split < 0:
        p.error("--epochs and --eval-every must be positive, --train-subset and --val-split >= 0")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    from fastmix.config import PRESETS
    from fastmix.data import DATASETS
    if args.preset not in PRESETS:
        p.error(f"--preset {args.preset!r} is unknown; choose from {', '.join(PRESETS)}")
    if args.dataset and args.dataset not in DATASETS + ("imagefolder",):
        p.error(f"--dataset {args.dataset!r} is unknown; choose from "
                f"{', '.join(DATASETS + ('imagefolder',))}")
    if args.check_against and not os.path.isfile(args.check_against):
        p.error(f"--check-against: no file {args.check_against}")
    return args


def run_argv(args, method, seed, out):
    """The train.py command line of one run (without --resume)."""
    argv = ["--preset", args.preset, "--method", method, "--seed", str(seed), "--out", out,
            "--epochs", str(args.epochs), "--eval-every", str(args.eval_every),
            "--val-split", str(args.val_split), "--no-progress"]
    if args.train_subset:
        argv += ["--train-subset", str(args.train_subset)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.dataset:
        argv += ["--dataset", args.dataset]
    if args.ema and method != "automix":
        argv += ["--ema"]
    alpha = ["--alpha", str(args.alpha[method])] if method in args.alpha else []
    return argv + METHOD_ARGS[method] + alpha + args.train_args.split()


def _write_json(path, obj, **kw):
    """Atomic: a temporary file in the same folder, fsynced, renamed over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, **kw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _die_with_parent():
    """In the child, before exec: SIGTERM when the driver dies (Linux PR_SET_PDEATHSIG = 1)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):   # not Linux: the process group alone
        pass


def run_child(cmd, **kw):
    """Run ``cmd`` in its own process group that dies with this driver: a SIGTERM or SIGINT to
    the driver is passed to the group (the run checkpoints and stops), and ``kill -9`` of the
    driver reaches the child through PR_SET_PDEATHSIG. Returns the exit status."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **kw)
    stopped = []

    def forward(signum, frame):
        # only pass it on: the handler interrupts proc.wait() below, which holds the Popen's
        # wait lock, so waiting here would deadlock; the interrupted wait resumes and returns
        # once the run has checkpointed and exited
        stopped.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
        if stopped:
            raise SystemExit(f"[study] stopped by signal {stopped[0]}; rerun the same command "
                             f"to resume")
        return rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def train_command():
    """The interpreter and script of one run: the checkout's ``train.py`` (run in ``ROOT``),
    else the installed trainer module (run in the current folder)."""
    if ROOT is not None:
        return [sys.executable, os.path.join(ROOT, "train.py")]
    return [sys.executable, "-m", "fastmix.train_cli"]


def run_one(args, method, seed):
    """Run (or continue, or skip) one cell of the grid; returns its folder."""
    out = os.path.join(args.out, method, f"seed{seed}")
    argv = run_argv(args, method, seed, out)
    marker = os.path.join(out, "study_run.json")
    if os.path.exists(marker):
        with open(marker) as f:
            before = json.load(f)["argv"]
        if before != argv:
            raise SystemExit(f"error: {out} was made by another command line:\n  {' '.join(before)}\n"
                             f"this study asks for\n  {' '.join(argv)}\nuse another --out")
        if os.path.exists(os.path.join(out, "summary.json")):
            print(f"[study] {method} seed {seed}: done, skipped", flush=True)
            return out
    os.makedirs(out, exist_ok=True)
    _write_json(marker, {"argv": argv})
    resume = ["--resume"] if os.path.exists(os.path.join(out, "last.pt")) else []
    print(f"[study] {method} seed {seed}: {'resuming' if resume else 'starting'}", flush=True)
    t = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    load = os.getloadavg()[0]
    with open(os.path.join(out, "train.log"), "a") as log:
        rc = run_child(train_command() + argv + resume, stdout=log, stderr=subprocess.STDOUT,
                       cwd=ROOT, env=env)
    # the machine's load around the run: its timings are comparable only at equal load
    _write_json(os.path.join(out, "study_load.json"),
                {"loadavg_1min_start": load, "loadavg_1min_end": os.getloadavg()[0],
                 "threads": args.threads or None})
    if rc != 0:
        raise SystemExit(f"error: {method} seed {seed} failed (exit {rc}); see {out}/train.log")
    print(f"[study] {method} seed {seed}: finished in {time.perf_counter() - t:.0f} s", flush=True)
    return out


# ---- aggregation -------------------------------------------------------------------------------
def mean_std(values):
    values = list(values)
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "values": values}


def read_run(folder):
    """One run's numbers from its summary.json and metrics.jsonl."""
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    tested = [r for r in history if "top1" in r]
    final, median = summary["final_top1"], summary["median_last10_top1"]
    heads = list(final)
    val_median = summary.get("median_last10_val_top1")
    if val_median:
        reported = max(heads, key=lambda h: val_median[h])
        rule = "best median validation top-1 of the last 10 epochs"
    else:
        reported = "one_k" if "one_k" in heads else heads[0]
        rule = "the inference head (no validation split)"
    losses = {}
    for r in history:
        for k, v in r["losses"].items():
            losses.setdefault(k, []).append(v)
    groups = _online_ema_groups(heads)
    pick = (lambda hs: max(hs, key=lambda h: val_median[h])) if val_median else (lambda hs: hs[0])
    return {"heads": heads, "final": final, "median": median,
            "torch_threads": summary.get("provenance", {}).get("machine", {}).get("torch_threads"),
            "online_head": pick(groups["online"]) if groups else None,
            "ema_head": pick(groups["ema"]) if groups else None,
            "val_median": val_median, "reported_head": reported, "reported_rule": rule,
            "best_test_head": max(heads, key=lambda h: median[h]),
            "curve": {"epoch": [r["epoch"] for r in tested],
                      "top1": {h: [r["top1"][h] for r in tested] for h in heads}},
            "val_curve": {"epoch": [r["epoch"] for r in history if "val_top1" in r],
                          "top1": {h: [r["val_top1"][h] for r in history if "val_top1" in r]
                                   for h in heads}},
            "last_losses": {k: v[-1] for k, v in losses.items()},
            # the median over epochs: robust to epochs slowed by other work on the machine
            "images_per_s": statistics.median(r["images_per_s"] for r in history),
            "wall_time_s": summary["wall_time_s"], "epochs": len(history),
            "config": summary["config"]}


def _online_ema_groups(heads):
    """The online and the EMA heads of a run, or None where it has no EMA head."""
    if "ema" in heads:
        return {"online": ["cls"], "ema": ["ema"]}
    if "one_k" in heads:
        return {"online": [h for h in ("one_q", "mix_q") if h in heads],
                "ema": [h for h in ("one_k", "mix_k") if h in heads]}
    return None


def _portable(config, folder):
    """A run's config without the machine's paths: ``out`` as the run folder relative to the
    results, ``data_dir`` as its last component."""
    config = dict(config)
    config["out"] = folder
    if config.get("data_dir"):
        config["data_dir"] = os.path.basename(os.path.normpath(config["data_dir"]))
    return config


def provenance(argv, script="bench/accuracy.py", command=None):
    """The commit (and whether the tracked files differ from it), the command, the package
    versions and the machine (:func:`fastmix.provenance.environment`): what regenerating these
    numbers needs. The command is ``python SCRIPT ARGV``, or ``COMMAND ARGV`` where ``command``
    is given (``fastmix-study``); an installed fastmix (no checkout) records no commit."""
    env = environment()
    env["machine"]["torch_threads_default"] = env["machine"].pop("torch_threads")
    return {**env, "command": f"{command or 'python ' + script} " + shlex.join(argv)}


def regenerate_command(run):
    """The command that reruns one finished run of the grid as it ran: its ``train.py`` command
    line and its thread count (``--threads``, else the count its summary records), from the run
    folder's ``study_run.json``, ``study_load.json`` and ``summary.json`` (None where the folder
    has no command line)."""
    if run.get("train_argv") is None:
        return None
    # --threads, else the threads the run itself recorded: another count rounds differently
    threads = (run.get("load") or {}).get("threads") or run.get("torch_threads")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + "python train.py " + \
        shlex.join(run["train_argv"])


def aggregate(args, folders, argv=(), command="python bench/accuracy.py"):
    """results.json + results.md from the runs in ``folders`` ({method: {seed: folder}});
    ``argv`` and ``command`` (how the study was invoked) go into its provenance."""
    methods = {}
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    for method, runs in folders.items():
        rs = {}
        for seed, f in runs.items():
            rs[seed] = r = read_run(f)
            rel = os.path.relpath(f, args.out)
            r["folder"] = rel
            r["config"] = _portable(r["config"], rel)
            load = os.path.join(f, "study_load.json")
            if os.path.exists(load):
                with open(load) as fh:
                    r["load"] = json.load(fh)
            marker = os.path.join(f, "study_run.json")
            if os.path.exists(marker):
                with open(marker) as fh:
                    argv_run = json.load(fh)["argv"]
                # no path of this machine: the run folder becomes a fresh one under
                # runs/regenerate/, any other absolute path (--data-dir) its last component
                r["train_argv"] = [os.path.join("runs", "regenerate", rel) if a == f else
                                   os.path.basename(os.path.normpath(a)) if os.path.isabs(a)
                                   else a for a in argv_run]
                r["regenerate"] = regenerate_command(r)
            with open(os.path.join(f, "metrics.jsonl")) as fh:
                history = [json.loads(line) for line in fh if line.strip()]
            with open(os.path.join(f, "summary.json")) as fh:
                summary = json.load(fh)
            summary["config"] = r["config"]
            _write_json(os.path.join(args.out, "runs", f"{method}-seed{seed}.json"),
                        {"summary": summary, "metrics": history}, indent=0)
        one = next(iter(rs.values()))
        entry = {"seeds": sorted(rs), "heads": one["heads"],
                 "reported_heads": {s: r["reported_head"] for s, r in rs.items()},
                 "reported_rule": one["reported_rule"],
                 "final": mean_std(r["final"][r["reported_head"]] for r in rs.values()),
                 "median_last10": mean_std(r["median"][r["reported_head"]] for r in rs.values()),
                 "per_head": {h: {"final": mean_std(r["final"][h] for r in rs.values()),
                                  "median_last10": mean_std(r["median"][h] for r in rs.values())}
                              for h in one["heads"]},
                 "best_test_head_median_last10": mean_std(
                     r["median"][r["best_test_head"]] for r in rs.values()),
                 "online_ema": None if one["online_head"] is None else {
                     k: {"heads": {s: r[f"{k}_head"] for s, r in rs.items()},
                         "final": mean_std(r["final"][r[f"{k}_head"]] for r in rs.values()),
                         "median_last10": mean_std(r["median"][r[f"{k}_head"]]
                                                   for r in rs.values())}
                     for k in ("online", "ema")},
                 "images_per_s": mean_std(r["images_per_s"] for r in rs.values()),
                 "wall_time_s": mean_std(r["wall_time_s"] for r in rs.values()),
                 "last_epoch_losses": {k: mean_std(r["last_losses"][k] for r in rs.values())
                                       for k in one["last_losses"]},
                 "runs": rs}
        methods[method] = entry
    protocol = {k: getattr(args, k) for k in ("preset", "dataset", "epochs", "train_subset",
                                              "val_split", "eval_every", "train_args", "alpha",
                                              "ema", "threads")}
    protocol.update(window=WINDOW, method_args=METHOD_ARGS,
                    data_dir=os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir else None)
    results = {"provenance": provenance(argv, command=command), "protocol": protocol,
               "methods": methods}
    cost = relative_cost(methods)
    if cost:
        results["automix_cost"] = cost
    _write_json(os.path.join(args.out, "results.json"), results, indent=1)
    tmp = os.path.join(args.out, f"results.md.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(markdown_table(results))
    os.replace(tmp, os.path.join(args.out, "results.md"))
    return results


def relative_cost(methods):
    """AutoMix's wall time per run and training images/s against each baseline's, in the same
    grid (means over seeds): the timings are comparable only where the runs saw the same load."""
    if "automix" not in methods:
        return None
    a = methods["automix"]
    return {m: {"wall_time_ratio": a["wall_time_s"]["mean"] / e["wall_time_s"]["mean"],
                "images_per_s_ratio": e["images_per_s"]["mean"] / a["images_per_s"]["mean"]}
            for m, e in methods.items() if m != "automix"}


def check_against(results, path):
    """The runs this grid shares with the committed ``path``: ``(same, differ)`` lists of
    (method, seed) by their per-head final and median-of-last-10 test top-1."""
    with open(path) as f:
        old = json.load(f)
    same, differ = [], []
    for m, e in results["methods"].items():
        for seed, r in e["runs"].items():
            o = old.get("methods", {}).get(m, {}).get("runs", {}).get(str(seed))
            if o is None:
                continue
            key = (m, seed)
            (same if (o["final"], o["median"]) == (r["final"], r["median"]) else differ).append(key)
    return same, differ


def _pm(ms, digits=2):
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def markdown_table(results):
    p = results["protocol"]
    lines = [f"Protocol: preset `{p['preset']}`"
             f"{', dataset `' + p['dataset'] + '`' if p.get('dataset') else ''}"
             f"{', every method but AutoMix with an EMA head (`--ema`)' if p.get('ema') else ''}"
             f", {p['epochs']} epochs, training subset "
             f"{p['train_subset'] or 'all'}, validation split {p['val_split']}, test every "
             f"{p['eval_every']} epochs and each of the last {p['window']}; test top-1 (%), "
             f"mean ± std over seeds.", "",
             "| method | seeds | head (chosen on val) | final top-1 | median of last 10 | "
             "training images/s (median epoch) | wall time per run (s) |", "|---|---|---|---|---|---|---|"]
    for m, e in results["methods"].items():
        heads = sorted(set(e["reported_heads"].values()))
        lines.append(f"| {m} | {len(e['seeds'])} | {', '.join(heads)} | {_pm(e['final'])} | "
                     f"{_pm(e['median_last10'])} | {e['images_per_s']['mean']:.0f} | "
                     f"{e['wall_time_s']['mean']:.0f} |")
    pairs = {m: e["online_ema"] for m, e in results["methods"].items() if e.get("online_ema")}
    if pairs:
        lines += ["", "Online head beside EMA head (each chosen on the validation split; test "
                  "top-1, mean ± std over seeds):", "",
                  "| method | online head | online: median of last 10 | EMA head | EMA: median "
                  "of last 10 | EMA − online |", "|---|---|---|---|---|---|"]
        for m, oe in pairs.items():
            on, em = oe["online"], oe["ema"]
            lines.append(f"| {m} | {', '.join(sorted(set(on['heads'].values())))} | "
                         f"{_pm(on['median_last10'])} | {', '.join(sorted(set(em['heads'].values())))} | "
                         f"{_pm(em['median_last10'])} | "
                         f"{em['median_last10']['mean'] - on['median_last10']['mean']:+.2f} |")
    if results.get("automix_cost"):
        lines += ["", "AutoMix's cost in this grid (means over seeds; wall time includes "
                  "evaluation): " + ", ".join(
                      f"{c['wall_time_ratio']:.2f}x {m}'s wall time ({c['images_per_s_ratio']:.2f}x "
                      f"fewer training images/s)" for m, c in results["automix_cost"].items()) + "."]
    for m, e in results["methods"].items():
        if len(e["heads"]) > 1:
            lines += ["", f"{m}, every head (test top-1, mean ± std over seeds):", "",
                      "| head | final | median of last 10 |", "|---|---|---|"]
            lines += [f"| {h} | {_pm(v['final'])} | {_pm(v['median_last10'])} |"
                      for h, v in e["per_head"].items()]
            lines.append(f"| best of the {len(e['heads'])} on *test* (the authors' rule; optimistic) | | "
                         f"{_pm(e['best_test_head_median_last10'])} |")
            diag = {k: v for k, v in e["last_epoch_losses"].items() if k.startswith("mask_")}
            if diag:
                lines += ["", f"{m}'s Mix Block in the last epoch (means over its steps; mean ± "
                          f"std over seeds): " + ", ".join(f"{k} {_pm(v, 3)}" for k, v in diag.items())
                          + " (mask_area_mb: kept area of x_i, to compare with λ_mb; "
                          "mask_area_err: |area − λ_mb|; mask_softness: mean 4m(1−m), 1 = a flat "
                          "0.5 blend as in Mixup, 0 = a binary mask as in CutMix)."]
    train_losses = {m: e["last_epoch_losses"]["loss"] for m, e in results["methods"].items()
                    if "loss" in e["last_epoch_losses"]}
    if train_losses:
        lines += ["", "Training loss in the last epoch (the method's own objective, on augmented "
                  "and mixed images): " + ", ".join(f"{m} {_pm(v, 3)}" for m, v in train_losses.items())
                  + "."]
    return "\n".join(lines) + "\n"


def plot_curves(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for m, e in results["methods"].items():
        runs = list(e["runs"].values())
        epochs = runs[0]["curve"]["epoch"]
        ys = [[r["curve"]["top1"][r["reported_head"]][i] for r in runs] for i in range(len(epochs))]
        mean = [statistics.fmean(y) for y in ys]
        heads = "/".join(sorted(set(e["reported_heads"].values())))
        line, = ax.plot(epochs, mean, marker=".", label=f"{m} ({heads}, n={len(runs)})")
        ax.fill_between(epochs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2,
                        color=line.get_color())
    p = results["protocol"]
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    finals = [v for e in results["methods"].values() for r in e["runs"].values()
              for v in r["curve"]["top1"][r["reported_head"]][-WINDOW:]]
    if finals:
        ax.set_ylim(max(0, min(finals) - 4), min(100, max(finals) + 1.5))
    ax.set_title(f"{p['preset']}: {p['epochs']} epochs on {p['train_subset'] or 'all'} training "
                 f"images; mean and min-max over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_masks(folder, path, n=8):
    """The Mix Block of the AutoMix run in ``folder`` on the first ``n`` test images."""
    import torch

    from fastmix.data import load_dataset
    from fastmix.config import config_from_dict
    from fastmix.engine import build_model, load_checkpoint
    from fastmix.visualize import save_mix_grid
    state = load_checkpoint(os.path.join(folder, "last.pt"))
    cfg = config_from_dict(state["config"])
    test_set = load_dataset(cfg.dataset, cfg.data_dir, train=False)
    model = build_model(cfg, test_set.images.shape[1], test_set.num_classes)
    model.load_state_dict(state["model"])
    return save_mix_grid(model.eval(), test_set.subset(n, 0), path, torch.device("cpu"), n=n)


def main(argv=None, command="fastmix-study"):
    """Run (or resume) the grid, then aggregate and plot; returns the results dict. ``command``
    is how results.json records the invocation (``bench/accuracy.py`` passes ``python
    bench/accuracy.py``); argparse's usage names the program as invoked."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    folders = {}
    t = time.perf_counter()
    for seed in args.seeds:          # seed-major: a partial grid has every method for some seeds
        for method in args.methods:
            out = os.path.join(args.out, method, f"seed{seed}")
            if args.aggregate_only:
                if os.path.exists(os.path.join(out, "summary.json")):
                    folders.setdefault(method, {})[seed] = out
                continue
            folders.setdefault(method, {})[seed] = run_one(args, method, seed)
    if not folders:
        raise SystemExit(f"error: no finished runs under {args.out}")
    results = aggregate(args, folders, sys.argv[1:] if argv is None else argv, command)
    plot_curves(results, os.path.join(args.out, "curves.png"))
    if "automix" in folders and not args.no_masks:
        first = folders["automix"][min(folders["automix"])]
        plot_masks(first, os.path.join(args.out, "automix_masks.png"))
    print(markdown_table(results))
    if args.check_against:
        same, differ = check_against(results, args.check_against)
        print(f"[study] against {args.check_against}: {len(same)} runs equal, {len(differ)} "
              f"differ{': ' + ', '.join(f'{m} seed {s}' for m, s in differ) if differ else ''}")
        if differ or not same:
            raise SystemExit(1)
    print(f"[study] wrote {args.out}/results.json, results.md, curves.png"
          f"{', automix_masks.png' if 'automix' in folders and not args.no_masks else ''} "
          f"({time.perf_counter() - t:.0f} s)")
    return results


def cli(argv=None) -> int:
    """The ``fastmix-study`` command: :func:`main`, exit status 0 once the study is written
    (errors exit non-zero through ``SystemExit``, as ``bench/accuracy.py``)."""
    main(argv, command="fastmix-study")
    return 0


if __name__ == "__main__":     # python -m fastmix.study
    main(command="python -m fastmix.study")
