"""
study_lm.py -- the Muon-vs-AdamW language-model study: tune both optimizers on one part of a corpus,
then compare the winners on a disjoint part, at two horizons and over seeds.

    python study_lm.py                                   # the tiny Shakespeare config (data: below)
    python study_lm.py --jobs=14 --device=cuda           # the same study, 14 runs at a time on one GPU

Every run is one `python train_muon.py ...` process (the trainer is not imported), in
out_dir/runs/<run>/ with its metrics.json; `jobs` of them run at a time.
1. Tuning, on `tune_data` with `tune_seeds` and `tune_steps` steps: each optimizer's grid is a star
   around its first values (the first value of every list is the center; each other value is tried
   with the other settings at the center), so both optimizers get 1 + sum(len - 1) configurations,
   which must be equal. The score is the final validation loss on tune_data's val shard.
2. Report, on `report_data` (text the tuning never saw) with `seeds`: the two winners train for each
   horizon in `horizons` (its own WSD schedule) on each seed (the seed sets the initial weights;
   the batches are the same). Per seed: the step at which Muon first reaches AdamW's final val loss
   (linear interpolation between evals) over the horizon. Summary per horizon: mean ratio with a
   bootstrap 95% CI over seeds, a one-sided t-test of ratio < 1, and the paired final-loss gap.

Data: two disjoint parts of a corpus, e.g. Shakespeare's plays a*-l* and m*-z* (GPT-2 BPE):

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache python prepare_fineweb.py --encoding=r50k_base \\
        --input='../shared/data/shakespeare/[a-l]*.txt' --shard_size=5e4 --txt_sample_by=paragraph \\
        --shuffle_seed=0 --out_dir=data/shakespeare_tune      # and [m-z] -> data/shakespeare_report

Rerunning reuses a finished run whose recorded settings and code hash (train_muon.py, model_keller.py,
muon_optim.py) are unchanged; anything else retrains. Outputs: out_dir/results.json (grids, every
score, winners, per-seed ratios, CIs, p-values), out_dir/study.md (the tables) and out_dir/study.png.
Every constant below can be overridden as --name=value (flags: True/False, lists: comma-separated).
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

# -----------------------------------------------------------------------------
# config (override with --name=value)
tune_data = "data/shakespeare_tune"  # shards of one part of the corpus (prepare_fineweb.py)
report_data = "data/shakespeare_report"  # shards of a disjoint part: the reported comparison
model = ("--vocab_top=4096 --n_layer=4 --n_embd=128 --n_head=4 --block_size=128 --batch_size=8 --grad_accum_steps=1 "
         "--warmup_steps=20 --momentum_muon_warmup=100 --eval_every=25 --eval_tokens=8192")  # train_muon.py flags
tune_steps = 300
tune_seeds = "100"
horizons = "300,1000"
seeds = "0,1,2"  # must be disjoint from tune_seeds
# star grids: "name=center,other,other;name=..."; name+name=a+b,c+d ties two settings (one axis)
grid_adamw = "lr_adamw=8e-3,2e-3,4e-3,6e-3,1.2e-2,1.6e-2,3.2e-2;weight_decay=0.1,0,0.01,0.03,0.3,1,3,10"
grid_muon = ("lr_muon=0.0125,0.00625,0.025,0.05;lr_embed=0.6,0.3,1.2;lr_head=0.008,0.004,0.016;"
             "ns_method=newton_schulz,polar_express;normuon=0.95,0,0.9,0.99;"
             "weight_decay_muon+cautious_wd=0+False,0.1+False,0.1+True")  # both: round 2 (results/lm.md)
n_boot = 10000
jobs = 2  # runs at a time (each: 1 CPU thread, or a share of the GPU)
device = "auto"  # passed to train_muon.py: auto | cpu | cuda
out_dir = "out/lm_study"
# -----------------------------------------------------------------------------
CONFIG = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
HERE = os.path.dirname(os.path.abspath(__file__))
CODE_FILES = ("train_muon.py", "model_keller.py", "muon_optim.py")  # what train_muon.py's code hash covers
LR_KEY = {"adamw": "lr_adamw", "muon": "lr_muon"}


# -----------------------------------------------------------------------------
# Small helpers pasted verbatim from shared_helpers.py (tests/test_consistency.py keeps the copies identical)

def parse_overrides(argv, defaults):
    """--name=value overrides of the constants at the top of a script (nanoGPT style).
    Flags are True/False; ints and floats are parsed as numbers (--eval_tokens=1e5 is an int if
    whole); strings are taken as written; lists are comma-separated strings. Unknown names and
    values of the wrong type stop with a message that lists the valid choices; --help (or -h)
    prints every setting with its default and comment."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(settings_help(defaults))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --name=value (names: {', '.join(config)}; --help lists them)")
        key, text = arg[2:].split("=", 1)
        if key not in config:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(config)}")
        default = config[key]
        if isinstance(default, bool):
            if text not in ("True", "False"):
                raise SystemExit(f"--{key}={text}: expected True or False")
            value = text == "True"
        elif isinstance(default, (int, float)):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{key}={text}: expected a number") from None
            if isinstance(default, int):
                if not value.is_integer():
                    raise SystemExit(f"--{key}={text}: expected a whole number")
                value = int(value)
        else:
            value = text
        config[key] = value
    return config


def settings_help(defaults):
    """Every setting as --name=default with the comment beside its constant at the top of this file."""
    with open(__file__) as f:
        lines = f.read().splitlines()
    comments = {}
    for line in lines:
        name, eq, rest = line.partition(" = ")
        if eq and name in defaults and name not in comments:
            comments[name] = rest.split("  # ", 1)[1] if "  # " in rest else ""
    shown = {k: f"--{k}={v}" for k, v in defaults.items()}
    width = min(40, max(map(len, shown.values())))
    out = [f"python {os.path.basename(__file__)} [--name=value ...]  (flags True/False, lists comma-separated)"]
    out += [f"  {shown[k]:<{width}}  {comments.get(k, '')}".rstrip() for k in defaults]
    return "\n".join(out)


def data_fingerprint(paths):
    """sha256 (first 16 hex digits) of the data files a run reads, in order: each file's name, size
    and content. Caches and resume key on it, so shards rewritten under the same path are noticed
    (hashing reads each file once, about a second per GB)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def run_identity(settings, code_hash, data_hash):
    """A run's identity, one flat JSON-normal dict: the resolved settings that change its result (the
    compute dtype muon_optim picks included), the hash of the code it runs and of the data it reads.
    A cached run is reused, and a checkpoint resumed, only on an equal identity; never on a path or label."""
    return json.loads(json.dumps({**settings, "source_hash": code_hash, "data_hash": data_hash}, sort_keys=True))


def identity_diff(old, new, may_differ=()):
    """['name: old -> new', ...] for each entry in which two run identities differ, except `may_differ`."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in may_differ and old.get(k) != new.get(k)]


def atomic_write_json(obj, path):
    """json.dump to a temp file, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def source_hash(*paths):
    """sha256 (first 16 hex digits) of the source files that determine a run: a cached result is
    reused only when the code that made it is unchanged."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# grids: pure functions

def parse_star_grid(text, opt_name):
    """'a=c,x,y;b+d=c1+c2,x1+x2' -> list of axes (names, [value tuples]); values stay strings (the
    trainer parses them). The first value of each axis is the star's center."""
    axes = []
    for part in (q.strip() for q in text.split(";")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--grid_{opt_name}: {part!r} is not name=center,v2,...")
        names, values = (x.strip() for x in part.split("=", 1))
        names = tuple(names.split("+"))
        vals = [tuple(v.strip().split("+")) for v in values.split(",") if v.strip()]
        if len(vals) < 2 or len(set(vals)) != len(vals) or any(len(v) != len(names) for v in vals):
            raise ValueError(f"--grid_{opt_name}: {part!r} needs 2+ distinct values, each with one part per name "
                             f"({'+'.join(names)})")
        axes.append((names, vals))
    return axes


def star_configs(axes):
    """The center (every axis at its first value), then each other value of each axis alone."""
    center = {n: v for names, vals in axes for n, v in zip(names, vals[0])}
    configs = [dict(center)]
    for names, vals in axes:
        for v in vals[1:]:
            configs.append(dict(center, **dict(zip(names, v))))
    return configs


def at_edge(winner, axes):
    """Axes whose winning value is the lowest or highest number of its list: extend that list."""
    edges = []
    for names, vals in axes:
        try:
            nums = [float(v[0]) for v in vals]
        except ValueError:
            continue  # not numeric (ns_method): no order
        w = float(winner[names[0]])
        if len(names) == 1 and w in (min(nums), max(nums)):
            edges.append(names[0])
    return edges


def config_name(opt, values):
    return opt + "".join(f"_{k}{v}" for k, v in values.items())


# -----------------------------------------------------------------------------
# runs: one train_muon.py process each, reused when settings and code match

def run_args(cfg, opt, values, data, seed, steps, run_dir):
    return (["train_muon.py", f"--optimizers={opt}", f"--data_dir={data}", f"--max_steps={steps}", f"--seed={seed}",
             f"--out_dir={run_dir}", "--save_checkpoint=False", "--threads=1", f"--device={cfg['device']}",
             "--log_every=100000", "--compile=False"]  # compiling costs more than these short runs gain
            + cfg["model"].split() + [f"--{k}={v}" for k, v in values.items()])


def finished_metrics(run_dir, args, code):
    """The run's metrics.json if it finished with exactly these arguments and this code, else None."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = json.load(f)
    ok = m.get("study_args") == args and m.get("code") == code and "summary" in m
    return m if ok else None


def run_one(cfg, spec, code):
    phase, opt, values, data, seed, steps = spec
    name = f"{phase}_{config_name(opt, values)}_seed{seed}_steps{steps}"
    run_dir = os.path.join(cfg["out_dir"], "runs", name)
    args = run_args(cfg, opt, values, data, seed, steps, run_dir)
    m = finished_metrics(run_dir, args, code)
    if m is None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run([sys.executable] + args, cwd=HERE, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
        with open(os.path.join(run_dir, "metrics.json")) as f:
            m = json.load(f)
        m["study_args"] = args
        atomic_write_json(m, os.path.join(run_dir, "metrics.json"))
    (run,) = m["runs"].values()
    return dict(name=name, phase=phase, optimizer=opt, values=values, data=data, seed=seed, steps=steps,
                val=run["val"], final_val=run["val"][-1]["loss"], code=m["code"])


def run_all(cfg, specs, desc, code):
    """Run the specs, `jobs` at a time, in spec order of results."""
    with ThreadPoolExecutor(cfg["jobs"]) as pool:
        futures = [pool.submit(run_one, cfg, s, code) for s in specs]
        for f in tqdm(futures, desc=desc):
            f.result()
        return [f.result() for f in futures]


# -----------------------------------------------------------------------------
# statistics: pure functions

def interpolated_step(val, target):
    """First step where the val curve, linearly interpolated between evals, is at or below target."""
    prev = None
    for pt in val:
        if pt["loss"] <= target:
            if prev is None or prev["loss"] == pt["loss"]:
                return float(pt["step"])
            frac = (prev["loss"] - target) / (prev["loss"] - pt["loss"])
            return prev["step"] + frac * (pt["step"] - prev["step"])
        prev = pt
    return None


def bootstrap_mean_ci(xs, n_boot, seed=0):
    """95% percentile CI of the mean, resampling the values with replacement."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = np.asarray(xs, dtype=float)
    means = x[rng.integers(len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def t_test_less(xs, mu):
    """One-sided one-sample t-test of mean(xs) < mu (scipy); None if undefined."""
    from scipy import stats
    if len(xs) < 2 or statistics.pstdev(xs) == 0:
        return None
    res = stats.ttest_1samp(xs, mu, alternative="less")
    return dict(t=float(res.statistic), p=float(res.pvalue))


def compare_horizon(muon_runs, adamw_runs, horizon, n_boot):
    """Per seed: Muon's step to reach AdamW's final val loss over the horizon (censored: 1.0, flagged)."""
    per_seed = []
    for m, a in zip(muon_runs, adamw_runs):
        step = interpolated_step(m["val"], a["final_val"])
        per_seed.append(dict(seed=m["seed"], adamw_final_val=a["final_val"], muon_final_val=m["final_val"],
                             muon_step=step, ratio=(step / horizon) if step is not None else 1.0,
                             censored=step is None))
    ratios = [r["ratio"] for r in per_seed]
    gaps = [r["muon_final_val"] - r["adamw_final_val"] for r in per_seed]
    return dict(horizon=horizon, per_seed=per_seed, mean_ratio=statistics.mean(ratios),
                ratio_ci=bootstrap_mean_ci(ratios, n_boot), ratio_test=t_test_less(ratios, 1.0),
                mean_loss_gap=statistics.mean(gaps), loss_gap_ci=bootstrap_mean_ci(gaps, n_boot),
                loss_gap_test=t_test_less(gaps, 0.0))


# -----------------------------------------------------------------------------
# the study

def fmt(values):
    return " ".join(f"{k}={v}" for k, v in values.items())


def main(cfg):
    cfg = dict(cfg, **{k: os.path.abspath(cfg[k]) for k in ("tune_data", "report_data", "out_dir")})
    tune_seed_list = [int(s) for s in str(cfg["tune_seeds"]).split(",") if s.strip()]
    seed_list = [int(s) for s in str(cfg["seeds"]).split(",") if s.strip()]
    horizon_list = [int(h) for h in str(cfg["horizons"]).split(",") if h.strip()]
    if set(tune_seed_list) & set(seed_list):
        raise ValueError(f"--tune_seeds {sorted(set(tune_seed_list) & set(seed_list))} overlap --seeds; use disjoint sets")
    if os.path.abspath(cfg["tune_data"]) == os.path.abspath(cfg["report_data"]):
        raise ValueError("--tune_data and --report_data are the same: report on text the tuning never saw")
    for d in (cfg["tune_data"], cfg["report_data"]):
        if not os.path.isdir(d):
            raise ValueError(f"no data dir {d}; make it with prepare_fineweb.py (commands: results/lm.md)")
    axes = {o: parse_star_grid(cfg[f"grid_{o}"], o) for o in ("adamw", "muon")}
    configs = {o: star_configs(axes[o]) for o in axes}
    if len(configs["adamw"]) != len(configs["muon"]):
        raise ValueError(f"unequal tuning budgets: adamw {len(configs['adamw'])}, muon {len(configs['muon'])} "
                         "configurations; give both grids as many")
    code = source_hash(*(os.path.join(HERE, f) for f in CODE_FILES))
    os.makedirs(cfg["out_dir"], exist_ok=True)
    print(f"tuning: {len(configs['adamw'])} configurations per optimizer on {cfg['tune_data']}, seeds {tune_seed_list}, "
          f"{cfg['tune_steps']} steps; report: {cfg['report_data']}, seeds {seed_list}, horizons {horizon_list}; code {code}")
    t0 = time.time()
    specs = [("tune", o, c, cfg["tune_data"], s, cfg["tune_steps"]) for o in ("adamw", "muon") for c in configs[o]
             for s in tune_seed_list]
    tune_runs = run_all(cfg, specs, "tuning", code)
    winners, tuning = {}, {}
    for o in ("adamw", "muon"):
        scores = []
        for c in configs[o]:
            rs = [r for r in tune_runs if r["optimizer"] == o and r["values"] == c]
            scores.append(dict(values=c, final_val=statistics.mean(r["final_val"] for r in rs)))
        best = min(range(len(scores)), key=lambda i: (scores[i]["final_val"], i))
        winners[o] = configs[o][best]
        tuning[o] = dict(scores=scores, winner=winners[o], at_edge=at_edge(winners[o], axes[o]))
        print(f"tuned {o}: {fmt(winners[o])} (val {scores[best]['final_val']:.4f})"
              + (f"; at the edge: {', '.join(tuning[o]['at_edge'])}" if tuning[o]["at_edge"] else ""))
    specs = [("report", o, winners[o], cfg["report_data"], s, h) for h in horizon_list for o in ("adamw", "muon")
             for s in seed_list]
    report_runs = run_all(cfg, specs, "report", code)
    horizons_out = []
    for h in horizon_list:
        pick = lambda o: [r for r in report_runs if r["optimizer"] == o and r["steps"] == h]  # noqa: E731
        horizons_out.append(compare_horizon(pick("muon"), pick("adamw"), h, cfg["n_boot"]))
    out = dict(config=cfg, code=code, minutes=(time.time() - t0) / 60, tuning=tuning, winners=winners,
               horizons=horizons_out, runs=[{k: v for k, v in r.items() if k != "val"} for r in tune_runs + report_runs],
               curves={r["name"]: r["val"] for r in report_runs})
    atomic_write_json(out, os.path.join(cfg["out_dir"], "results.json"))
    md = tables(out)
    with open(os.path.join(cfg["out_dir"], "study.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    plot(out, os.path.join(cfg["out_dir"], "study.png"))
    return out


def tables(out):
    lines = ["| horizon | AdamW final val (mean) | Muon final val (mean) | Muon/AdamW steps (mean) | 95% CI (bootstrap) "
             "| p (ratio < 1) | per seed |", "|---|---|---|---|---|---|---|"]
    for h in out["horizons"]:
        p = h["ratio_test"]["p"] if h["ratio_test"] else float("nan")
        per = ", ".join(f"{r['ratio']:.2f}" + ("*" if r["censored"] else "") for r in h["per_seed"])
        lines.append(f"| {h['horizon']} | {statistics.mean(r['adamw_final_val'] for r in h['per_seed']):.4f} | "
                     f"{statistics.mean(r['muon_final_val'] for r in h['per_seed']):.4f} | {h['mean_ratio']:.3f} | "
                     f"{h['ratio_ci'][0]:.3f}-{h['ratio_ci'][1]:.3f} | {p:.2g} | {per} |")
    lines += ["", "| optimizer | configuration | tuning val loss |", "|---|---|---|"]
    for o, t in out["tuning"].items():
        for s in sorted(t["scores"], key=lambda s: s["final_val"]):
            mark = "**" if s["values"] == t["winner"] else ""
            lines.append(f"| {o} | {mark}{fmt(s['values'])}{mark} | {s['final_val']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(out, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axs = plt.subplots(1, len(out["horizons"]), figsize=(6 * len(out["horizons"]), 4), squeeze=False)
    for ax, h in zip(axs[0], out["horizons"]):
        for name, val in out["curves"].items():
            if name.endswith(f"_steps{h['horizon']}"):
                color = "tab:red" if "_muon_" in name or name.startswith("report_muon") else "tab:blue"
                ax.plot([p["step"] for p in val], [p["loss"] for p in val], color=color, alpha=0.6,
                        label="Muon" if color == "tab:red" else "AdamW")
        finals = [r[k] for r in h["per_seed"] for k in ("adamw_final_val", "muon_final_val")]
        ax.set_ylim(min(finals) - 0.2, min(finals) + 2.5)  # the first evals (near ln(vocab)) would flatten the rest
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys())
        ax.set_title(f"{h['horizon']} steps: Muon/AdamW {h['mean_ratio']:.2f} "
                     f"(CI {h['ratio_ci'][0]:.2f}-{h['ratio_ci'][1]:.2f})")
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (report data)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main(parse_overrides(sys.argv[1:], CONFIG))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
