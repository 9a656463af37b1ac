#!/usr/bin/env python3
"""Benchmark: merge-service against mergekit on Llama-3.2-1B-shaped checkpoints (CPU).

Measures wall time and peak RSS of `merge-service merge` for task_arithmetic, ties and tsv,
and of mergekit's `mergekit-yaml` for task_arithmetic and ties, each run in a fresh process;
checks the outputs against each other (TA: max |diff|, TIES: agreement within bf16 rounding);
writes bench/results/merge_bench.json and bench/results/merge_bench.md and prints the table.

    python bench/run_merge_bench.py                 # everything (what `make bench` runs)
    python bench/run_merge_bench.py --methods task_arithmetic,ties --no-mergekit-bf16

Measurement:
- every merge is a child process; its peak RSS is `ru_maxrss` from `os.wait4` (exact, the
  kernel's high-water mark of the process's resident set: anonymous memory plus file pages
  mapped into it, e.g. safetensors mmaps), taken by a small launcher process that forks it
  (a child forked from this harness would start from the harness's own high-water mark). A
  sampler also reads /proc/PID/status every 0.1 s to split the peak into anonymous and
  file-backed pages (sampled, so approximate).
- wall time: from spawn to exit, including interpreter start and imports (and the launcher's
  start, some 20 ms).
- before every run the page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs
  root), so every run reads its inputs from disk; where that is not permitted, every input file
  is read once first so that every run sees a warm cache (the results say which).

Settings, chosen so both tools compute the same thing:
- task_arithmetic: ours alpha 1.0, weights 1.0; mergekit task_arithmetic, weight 1.0,
  normalize false, lambda 1.0: both θ0 + Σ_t (θ_t − θ0).
- ties: ours density 0.2, alpha 1.0, weights 1.0 (METHODS.md 3: trim to floor(0.2·numel),
  sign election by mass, disjoint MEAN); mergekit ties density 0.2, weight 1.0, lambda 1.0 and
  normalize TRUE: mergekit divides the sign-agreeing sum by Σ w_t over agreeing non-zero
  entries, which with w_t = 1 is our disjoint mean (normalize false would be a disjoint sum).
  Known remaining differences: mergekit keeps max(1, int(density·numel)) entries (same count
  as ours for every tensor here) and breaks magnitude ties by a non-stable argsort (ours: lower
  index first).
- mergekit runs twice per method: `dtype: float32` (arithmetic in float32, as ours:
  compute_dtype float32; the like-for-like comparison) and with no `dtype` (mergekit's
  default: arithmetic in the checkpoint's bfloat16, less memory, less precise). Both write
  bfloat16 (`out_dtype`), 2 GB shards (`--out-shard-size 2B`, bytes), no tokenizer copy.
- tsv is slow on 2 cores (~20 s per 8192×2048 SVD, ~6 SVDs per matrix). `--tsv full` runs the
  whole model; the default `--tsv subset` runs two subsets through `options.include`
  (embed_tokens + all norms + layer 0; the same + layer 1), and extrapolates the time to 16
  layers linearly: t_full = t_2 + 14·(t_2 − t_1). The subsets contain the largest tensor
  and one or two full layers, so their peak RSS is that of the whole model's merge.

Memory bound checked for every method: (T + 2) × largest tensor in float32 + 512 MiB, with
T = 4 and the largest tensor embed_tokens (128256 × 2048).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_VENV = Path(os.environ.get("MERGE_BENCH_MAIN_VENV", ROOT / ".venv"))
MK_VENV = Path(os.environ.get("MERGE_BENCH_MERGEKIT_VENV", HERE / ".venv-mergekit"))
TASKS = 4
LARGEST_NUMEL = 128256 * 2048  # embed_tokens
BOUND_SLACK = 512 * 2**20
SHARD = "2GB"  # ours (2e9 bytes); mergekit --out-shard-size 2B (2e9 bytes)
LAYERS = 16
TIES_DENSITY = 0.2


# --------------------------------------------------------------------------- measuring

@dataclass
class Measurement:
    label: str
    tool: str  # ours | mergekit
    method: str
    variant: str
    command: list[str]
    returncode: int = -1
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    peak_rss_bytes: int = 0
    other_cpu_cores: float = 0.0  # average CPU use by every other process during the run
    repeat: int = 1
    sampled_peak_anon_bytes: int = 0
    sampled_peak_file_bytes: int = 0
    output: str = ""
    log: str = ""
    extra: dict = field(default_factory=dict)


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def busy_cpu_s() -> float:
    """Seconds of CPU time the whole machine spent busy (not idle, not iowait) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm_read(paths: list[Path]) -> None:
    for directory in paths:
        for file in sorted(directory.glob("*.safetensors")):
            with file.open("rb") as f:
                while f.read(64 * 2**20):
                    pass


# Linux starts a child's ru_maxrss at the high-water RSS of the image it was forked from and
# keeps it across exec: measured from this harness (torch imported, sometimes the inputs just
# built in it), a 0.3 GB merge read as 1.5 GB. So a small launcher, started fresh, forks and
# execs the measured command and reports that child's rusage.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kb": usage.ru_maxrss, "user_s": usage.ru_utime,
               "sys_s": usage.ru_stime}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _only_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def measure(m: Measurement, log_path: Path, cache: str, inputs: list[Path]) -> Measurement:
    if cache == "cold":
        if not drop_caches():
            raise RuntimeError("cannot drop the page cache; use --cache warm")
    else:
        warm_read(inputs)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    peaks = {"RssAnon": 0, "RssFile": 0}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        busy0 = busy_cpu_s()
        started = time.perf_counter()
        usage_path = log_path.with_suffix(".rusage.json")
        usage_path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, str(usage_path),
                                 *m.command], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        stop = threading.Event()

        def sample() -> None:
            child = None
            while not stop.is_set():
                child = child or _only_child(proc.pid)
                if child is not None:
                    s = _status_kb(child)
                    for key in peaks:
                        peaks[key] = max(peaks[key], s.get(key, 0))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, launcher = os.wait4(proc.pid, 0)
        m.wall_s = time.perf_counter() - started
        busy1 = busy_cpu_s()
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    m.returncode = proc.returncode
    usage = json.loads(usage_path.read_text())
    m.user_s, m.sys_s = usage["user_s"], usage["sys_s"]
    m.peak_rss_bytes = usage["maxrss_kb"] * 1024  # KiB on Linux
    measured = launcher.ru_utime + launcher.ru_stime  # wait4: the launcher and its child
    other = (busy1 - busy0) - measured
    m.other_cpu_cores = round(max(0.0, other) / m.wall_s, 2) if m.wall_s else 0.0
    m.sampled_peak_anon_bytes = peaks["RssAnon"] * 1024
    m.sampled_peak_file_bytes = peaks["RssFile"] * 1024
    m.log = str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path)
    return m


# --------------------------------------------------------------------------- run specs

def ours_spec(method: str, ckpt: Path, out: Path, include: list[str] | None = None) -> dict:
    params = {"task_arithmetic": {"alpha": 1.0},
              "ties": {"density": TIES_DENSITY, "alpha": 1.0},
              "tsv": {"alpha": 1.0}}[method]
    spec = {
        "name": f"bench-{method}",
        "base": str(ckpt / "base"),
        "models": [{"source": str(ckpt / f"task{t}"), "weight": 1.0, "name": f"task{t}"}
                   for t in range(1, TASKS + 1)],
        "method": {"name": method, "params": params},
        "output": {"format": "full", "destination": str(out), "dtype": "bfloat16",
                   "shard_size": SHARD},
        "options": {"device": "cpu", "compute_dtype": "float32"},
    }
    if include:
        spec["options"]["include"] = include
    return spec


def mergekit_config(method: str, ckpt: Path, dtype: str | None) -> dict:
    params: dict = {"weight": 1.0}
    if method == "ties":
        params["density"] = TIES_DENSITY
    config: dict = {
        "merge_method": method,
        "base_model": str(ckpt / "base"),
        "models": [{"model": str(ckpt / f"task{t}"), "parameters": dict(params)}
                   for t in range(1, TASKS + 1)],
        # TA: normalize false = plain sum; TIES: normalize true = disjoint mean (see docstring)
        "parameters": {"normalize": method == "ties", "lambda": 1.0},
        "out_dtype": "bfloat16",
    }
    if dtype:
        config["dtype"] = dtype
    return config


def write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- comparing

def open_model(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / v for k, v in weight_map.items()}
    names: dict[str, Path] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


class Reader:
    def __init__(self, directory: Path) -> None:
        self.map = open_model(directory)
        self.handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        file = self.map[name]
        if file not in self.handles:
            self.handles[file] = safe_open(str(file), "pt")
        return self.handles[file].get_tensor(name)  # type: ignore[attr-defined]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (float32 in, float32 out)."""
    _, exponent = torch.frexp(x.abs())  # |x| = m · 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - 8)


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Stream both models tensor by tensor: max |a − b|, bit-identical and ≤ 1 bf16 ulp shares."""
    a, b = Reader(a_dir), Reader(b_dir)
    common = sorted(set(a.map) & set(b.map))
    total = identical = within = 0
    max_abs, max_rel_ulps, worst = 0.0, 0.0, None
    shape_mismatch = []
    for name in common:
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape:
            shape_mismatch.append(name)
            continue
        x32, y32 = x.float(), y.float()
        diff = (x32 - y32).abs()
        ulp = bf16_ulp(torch.maximum(x32.abs(), y32.abs()))
        n = x.numel()
        total += n
        identical += int((x.view(torch.int16) == y.view(torch.int16)).sum()) \
            if x.dtype == y.dtype == torch.bfloat16 else int((diff == 0).sum())
        within += int((diff <= ulp).sum())
        d = float(diff.max()) if n else 0.0
        if d > max_abs:
            max_abs, worst = d, name
        ulps = diff / ulp.clamp_min(torch.finfo(torch.float32).tiny)
        max_rel_ulps = max(max_rel_ulps, float(ulps.max()) if n else 0.0)
        del x, y, x32, y32, diff, ulp, ulps
    return {
        "a": str(a_dir.relative_to(ROOT)), "b": str(b_dir.relative_to(ROOT)),
        "tensors_compared": len(common),
        "only_in_a": sorted(set(a.map) - set(b.map)),
        "only_in_b": sorted(set(b.map) - set(a.map)),
        "shape_mismatch": shape_mismatch,
        "entries": total,
        "max_abs_diff": max_abs, "max_abs_diff_tensor": worst,
        "max_diff_in_bf16_ulps": max_rel_ulps,
        "fraction_bit_identical": identical / total if total else 0.0,
        "fraction_within_1_bf16_ulp": within / total if total else 0.0,
    }


def ta_reference_error(ckpt: Path, merged: Path) -> dict:
    """Against θ0 + Σ(θ_t − θ0) computed in float64 and rounded once to bfloat16."""
    base = Reader(ckpt / "base")
    tasks = [Reader(ckpt / f"task{t}") for t in range(1, TASKS + 1)]
    out = Reader(merged)
    total = exact = within = 0
    max_abs = 0.0
    for name in sorted(base.map):
        b = base.get(name).double()
        ref = b.clone()
        for r in tasks:
            ref += r.get(name).double() - b
        ref_bf = ref.to(torch.bfloat16)
        y = out.get(name)
        total += y.numel()
        exact += int((y.view(torch.int16) == ref_bf.view(torch.int16)).sum())
        diff = (y.double() - ref).abs()
        within += int((diff.float() <= bf16_ulp(ref.float())).sum())
        max_abs = max(max_abs, float(diff.max()))
    return {"model": str(merged.relative_to(ROOT)), "entries": total,
            "fraction_correctly_rounded": exact / total,
            "fraction_within_1_bf16_ulp": within / total,
            "max_abs_error_vs_float64": max_abs}


# --------------------------------------------------------------------------- helpers

def run_quiet(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()
    except OSError:
        return ""


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    mk = run_quiet([str(MK_VENV / "bin/python"), "-c",
                    "import importlib.metadata as m, torch; "
                    "print(m.version('mergekit'), torch.__version__, m.version('transformers'))"
                    ]).split()
    commit = run_quiet(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(run_quiet(["git", "status", "--porcelain", "--", "merge_service"]))
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch_ours": torch.__version__, "torch_threads": torch.get_num_threads(),
        "mergekit": mk[0] if mk else None, "torch_mergekit": mk[1] if len(mk) > 1 else None,
        "transformers_mergekit": mk[2] if len(mk) > 2 else None,
        "merge_service_commit": commit + ("+dirty" if dirty else ""),
        "gpu": torch.cuda.is_available(),
    }


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def ensure_inputs(ckpt: Path, need_mergekit: bool) -> None:
    subprocess.run([sys.executable, str(HERE / "make_checkpoints.py"), "--out", str(ckpt),
                    "--tasks", str(TASKS)], check=True)
    if need_mergekit and not (MK_VENV / "bin" / "mergekit-yaml").exists():
        subprocess.run(["bash", str(HERE / "setup_mergekit.sh")], check=True)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=HERE / "out" / "llama1b")
    parser.add_argument("--work", type=Path, default=HERE / "out" / "merges")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--methods", default="task_arithmetic,ties,tsv")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--no-mergekit-bf16", action="store_true",
                        help="skip mergekit's default (bfloat16 arithmetic) runs")
    parser.add_argument("--no-mergekit-float32", action="store_true",
                        help="skip mergekit's `dtype: float32` runs")
    parser.add_argument("--tsv", choices=["subset", "full"], default="subset")
    parser.add_argument("--cache", choices=["cold", "warm", "auto"], default="auto")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every run (tsv subsets: one); the table shows the "
                             "best wall time and the highest peak RSS")
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep the merged models under --work (2.5 GB each)")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ckpt = args.checkpoints.resolve()
    work = args.work.resolve()
    ensure_inputs(ckpt, need_mergekit=not args.no_mergekit)
    cache = args.cache
    if cache == "auto":
        cache = "cold" if drop_caches() else "warm"
    inputs = [ckpt / "base"] + [ckpt / f"task{t}" for t in range(1, TASKS + 1)]
    ours_bin = MAIN_VENV / "bin" / "merge-service"
    mk_bin = MK_VENV / "bin" / "mergekit-yaml"

    runs: list[tuple[Measurement, Path]] = []
    for method in methods:
        if method == "tsv" and args.tsv == "subset":
            norms = r"(input_layernorm|post_attention_layernorm|model\.norm)\."
            subsets = {
                "L1": ["embed_tokens", norms, r"^model\.layers\.0\."],
                "L2": ["embed_tokens", norms, r"^model\.layers\.[01]\."],
            }
            for tag, include in subsets.items():
                out = work / f"ours-tsv-{tag}"
                spec = work / "specs" / f"ours-tsv-{tag}.yaml"
                write_yaml(spec, ours_spec(method, ckpt, out, include))
                m = Measurement(f"ours tsv ({tag} subset)", "ours", method, f"subset-{tag}",
                                [str(ours_bin), "merge", str(spec), "--overwrite", "-q"],
                                output=str(out), extra={"include": include})
                runs.append((m, out))
            continue
        out = work / f"ours-{method}"
        spec = work / "specs" / f"ours-{method}.yaml"
        write_yaml(spec, ours_spec(method, ckpt, out))
        runs.append((Measurement(f"ours {method}", "ours", method, "float32",
                                 [str(ours_bin), "merge", str(spec), "--overwrite", "-q"],
                                 output=str(out)), out))
        if args.no_mergekit or method not in ("task_arithmetic", "ties"):
            continue
        variants = ([] if args.no_mergekit_float32 else [("float32", "float32")]) + \
            ([] if args.no_mergekit_bf16 else [("bfloat16", None)])
        for variant, dtype in variants:
            out = work / f"mergekit-{method}-{variant}"
            config = work / "specs" / f"mergekit-{method}-{variant}.yaml"
            write_yaml(config, mergekit_config(method, ckpt, dtype))
            runs.append((Measurement(
                f"mergekit {method} ({'dtype float32' if dtype else 'default: bf16 math'})",
                "mergekit", method, variant,
                [str(mk_bin), str(config), str(out), "--out-shard-size", "2B",
                 "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                output=str(out)), out))

    results: list[Measurement] = []
    for round_ in range(1, args.repeat + 1):  # rounds interleave the tools: drift hits both
        for template, out in runs:
            if round_ > 1 and template.variant.startswith("subset"):
                continue  # tsv subsets are long: one round
            m = Measurement(**{**asdict(template), "extra": dict(template.extra)})
            m.repeat = round_
            if out.exists():
                shutil.rmtree(out)
            print(f"running {m.label} (round {round_}/{args.repeat}) ...", flush=True)
            slug = Path(m.output).name
            measure(m, work / "logs" / f"{slug}.{round_}.log", cache, inputs)
            status = "ok" if m.returncode == 0 else f"FAILED rc={m.returncode} (see {m.log})"
            print(f"  {m.wall_s:.1f} s, peak RSS {gb(m.peak_rss_bytes)} GB "
                  f"(sampled anon {gb(m.sampled_peak_anon_bytes)} GB, file "
                  f"{gb(m.sampled_peak_file_bytes)} GB), other processes "
                  f"{m.other_cpu_cores:.2f} cores: {status}", flush=True)
            report = out / "merge_report.json"
            if m.tool == "ours" and report.is_file():
                r = json.loads(report.read_text())
                m.extra["merge_report_timings_s"] = r.get("timings_s")
                m.extra["merge_report_peak_memory"] = r.get("peak_memory")
            results.append(m)

    # one row per run: the best (lowest) wall time of the rounds, the highest peak RSS
    summary: list[Measurement] = []
    for template, _ in runs:
        mine = [m for m in results if m.label == template.label]
        good = [m for m in mine if m.returncode == 0]
        if not good:
            summary.append(mine[-1])
            continue
        best = min(good, key=lambda m: m.wall_s)
        row = Measurement(**{**asdict(best), "extra": dict(best.extra)})
        row.peak_rss_bytes = max(m.peak_rss_bytes for m in good)
        row.sampled_peak_anon_bytes = max(m.sampled_peak_anon_bytes for m in good)
        row.sampled_peak_file_bytes = max(m.sampled_peak_file_bytes for m in good)
        row.extra["rounds_wall_s"] = [round(m.wall_s, 2) for m in good]
        row.extra["rounds_peak_rss_bytes"] = [m.peak_rss_bytes for m in good]
        row.extra["rounds_other_cpu_cores"] = [m.other_cpu_cores for m in good]
        summary.append(row)

    by_key = {(m.tool, m.method, m.variant): m for m in summary if m.returncode == 0}
    out_of = {k: Path(m.output) for k, m in by_key.items()}

    checks: dict[str, dict] = {}
    if not args.no_compare:
        for method in ("task_arithmetic", "ties"):
            ours = out_of.get(("ours", method, "float32"))
            for variant in ("float32", "bfloat16"):
                theirs = out_of.get(("mergekit", method, variant))
                if ours and theirs:
                    print(f"comparing ours {method} with mergekit ({variant}) ...", flush=True)
                    checks[f"{method}: ours vs mergekit {variant}"] = compare(ours, theirs)
        ta = out_of.get(("ours", "task_arithmetic", "float32"))
        if ta:
            print("checking ours task_arithmetic against a float64 reference ...", flush=True)
            checks["task_arithmetic: ours vs float64 reference"] = ta_reference_error(ckpt, ta)
        mk_ta = out_of.get(("mergekit", "task_arithmetic", "float32"))
        if mk_ta:
            checks["task_arithmetic: mergekit float32 vs float64 reference"] = \
                ta_reference_error(ckpt, mk_ta)

    bound = (TASKS + 2) * LARGEST_NUMEL * 4 + BOUND_SLACK
    rows = []
    for m in summary:
        row = {
            "label": m.label, "tool": m.tool, "method": m.method, "variant": m.variant,
            "ok": m.returncode == 0, "wall_s": round(m.wall_s, 2),
            "cpu_s": round(m.user_s + m.sys_s, 2), "peak_rss_bytes": m.peak_rss_bytes,
            "sampled_peak_anon_bytes": m.sampled_peak_anon_bytes,
            "sampled_peak_file_bytes": m.sampled_peak_file_bytes,
            "rss_over_bound": round(m.peak_rss_bytes / bound, 3),
            "within_bound": m.peak_rss_bytes < bound,
            "rounds_wall_s": m.extra.get("rounds_wall_s", [round(m.wall_s, 2)]),
            "other_cpu_cores": m.extra.get("rounds_other_cpu_cores", [m.other_cpu_cores]),
        }
        if m.tool == "ours":
            for variant in ("float32", "bfloat16"):
                mk = by_key.get(("mergekit", m.method, variant))
                if mk and m.returncode == 0:
                    row[f"time_ratio_vs_mergekit_{variant}"] = round(m.wall_s / mk.wall_s, 3)
                    row[f"rss_ratio_vs_mergekit_{variant}"] = round(
                        m.peak_rss_bytes / mk.peak_rss_bytes, 3)
        rows.append(row)

    tsv_estimate = None
    l1 = by_key.get(("ours", "tsv", "subset-L1"))
    l2 = by_key.get(("ours", "tsv", "subset-L2"))
    if l1 and l2:
        per_layer = l2.wall_s - l1.wall_s
        tsv_estimate = {
            "method": "t_full = t_L2 + (16 - 2) * (t_L2 - t_L1)",
            "per_layer_s": round(per_layer, 1),
            "estimated_full_wall_s": round(l2.wall_s + (LAYERS - 2) * per_layer, 1),
            "peak_rss_bytes": max(l1.peak_rss_bytes, l2.peak_rss_bytes),
        }

    result = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "cache": "cold (page cache dropped before every run)" if cache == "cold" else
                 "warm (every input read once before every run)",
        "checkpoints": {"layout": "Llama-3.2-1B", "dtype": "bfloat16", "tasks": TASKS,
                        "params_per_model": 1235814400,
                        "settings": json.loads((ckpt / ".bench-complete").read_text())},
        "memory_bound": {"formula": "(T + 2) * largest tensor (float32) + 512 MiB",
                         "T": TASKS, "largest_tensor": "model.embed_tokens.weight",
                         "largest_float32_bytes": LARGEST_NUMEL * 4, "bound_bytes": bound},
        "runs": rows,
        "tsv_extrapolation": tsv_estimate,
        "checks": checks,
        "repeat": args.repeat,
        "measurements": [asdict(m) for m in results],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "merge_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.results / "merge_bench.md").write_text(table)
    print()
    print(table)
    if not args.keep_outputs:
        for m in summary:
            shutil.rmtree(m.output, ignore_errors=True)
    return 0 if all(m.returncode == 0 for m in results) else 2


def markdown(r: dict) -> str:
    bound = r["memory_bound"]["bound_bytes"]
    mach = r["machine"]
    lines = [
        "# merge-service vs mergekit: Llama-3.2-1B-shaped merge, CPU",
        "",
        f"Generated {r['generated_at']} by `bench/run_merge_bench.py`. Machine: {mach['cpu']}, "
        f"{mach['cpus']} cores, {mach['memory_bytes'] / 2**30:.0f} GiB RAM, no GPU; "
        f"torch {mach['torch_ours']} (both sides), mergekit {mach['mergekit']}, "
        f"merge-service {mach['merge_service_commit']}. Page cache: {r['cache']}.",
        "",
        f"Inputs: base + {r['checkpoints']['tasks']} task models, Llama-3.2-1B layout "
        "(1.24 B params, bf16, 2 shards each). Output bf16, 2 GB shards. Peak RSS = "
        "`ru_maxrss` of the merge process (wait4). Memory bound = (T + 2) × largest tensor "
        f"(float32) + 512 MiB = {gb(bound)} GB.",
        "",
        f"Rounds per run: {r['repeat']} (tsv subsets: 1); wall = the best round, peak RSS = "
        "the highest round. \"other load\" = CPU cores used by all other processes during "
        "the run (noise indicator; the machine has 2 cores).",
        "",
        "| run | wall s | CPU s | peak RSS GB | RSS / bound | time ours/mk f32 "
        "| RSS ours/mk f32 | time ours/mk bf16 | RSS ours/mk bf16 | rounds wall s "
        "| other load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in r["runs"]:
        def ratio(key: str, row: dict = row) -> str:
            return f"{row[key]:.2f}" if key in row else ""
        ok = "" if row["ok"] else " **FAILED**"
        lines.append(
            f"| {row['label']}{ok} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} "
            f"| {gb(row['peak_rss_bytes'])} | {row['rss_over_bound']:.2f} "
            f"| {ratio('time_ratio_vs_mergekit_float32')} "
            f"| {ratio('rss_ratio_vs_mergekit_float32')} "
            f"| {ratio('time_ratio_vs_mergekit_bfloat16')} "
            f"| {ratio('rss_ratio_vs_mergekit_bfloat16')} "
            f"| {', '.join(f'{w:.0f}' for w in row['rounds_wall_s'])} "
            f"| {', '.join(f'{c:.2f}' for c in row['other_cpu_cores'])} |")
    est = r.get("tsv_extrapolation")
    if est:
        lines += ["", f"tsv, whole model (EXTRAPOLATED from the two subset runs, "
                      f"{est['method']}): ~{est['estimated_full_wall_s'] / 60:.0f} min "
                      f"({est['per_layer_s']:.0f} s per layer); peak RSS "
                      f"{gb(est['peak_rss_bytes'])} GB (the subsets hold the largest tensor "
                      "and whole layers, so this is the full run's peak)."]
    lines += ["", "Peak RSS split (sampled every 0.1 s from /proc: anonymous / file-backed "
                  "pages such as safetensors mmaps):", ""]
    for row in r["runs"]:
        lines.append(f"- {row['label']}: anon {gb(row['sampled_peak_anon_bytes'])} GB, "
                     f"file {gb(row['sampled_peak_file_bytes'])} GB")
    if r["checks"]:
        lines += ["", "Output checks (streamed over every tensor):", "",
                  "| check | entries | max abs diff | max diff (bf16 ulps) | bit-identical "
                  "| within 1 bf16 ulp |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, c in r["checks"].items():
            if "max_abs_error_vs_float64" in c:
                lines.append(f"| {name} | {c['entries']:,} | {c['max_abs_error_vs_float64']:.3g} "
                             f"| | {c['fraction_correctly_rounded']:.6f} (correctly rounded) "
                             f"| {c['fraction_within_1_bf16_ulp']:.6f} |")
            else:
                lines.append(f"| {name} | {c['entries']:,} | {c['max_abs_diff']:.3g} "
                             f"| {c['max_diff_in_bf16_ulps']:.1f} "
                             f"| {c['fraction_bit_identical']:.6f} "
                             f"| {c['fraction_within_1_bf16_ulp']:.6f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
