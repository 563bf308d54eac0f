"""Preprocess benchmark: `pyoco preprocess` against a hand-written one-process script, per core, 1 → 2 cores,
1 → 2 loopback Ray nodes, and driver memory for N and k·N videos.

    python bench/preprocess.py --quick          # ~5 min on 2 cores: N=20, k=10, 32 frames at 128 px
    python bench/preprocess.py                  # N=60, k=10, 64 frames at 256 px (600 videos, as in issue 14)
    python bench/preprocess.py --no-nodes       # skip the loopback 2-node cluster
    python bench/preprocess.py --profile        # also: one pyoco run under cProfile + Ray Data stats

One method for every setting. A *setting* is a job (bare decode / the baseline script / pyoco) on a number
of cores (and Ray nodes). Its throughput is the marginal rate between a corpus of N and one of k·N videos:

    rate = (k·N - N) / (t(k·N) - t(N))      videos/s

where each t is the fastest of ``--repeats`` runs (default 2, N and k·N alternating) of the job's wall time
(after its set-up: imports, model load, ``ray.init``) in a fresh process started under ``taskset`` on exactly the cores
measured (pyoco starts its own Ray inside with ``num_cpus`` = cores, so the raylet and every worker inherit
the pinning). Fixed costs (interpreter, Ray start-up, model load, the tail of the last task) cancel in the
difference, but their run-to-run noise does not: when t(k·N) - t(N) < t(N) the bench prints a WARNING. The
k·N corpus is k·N distinct synth videos, and the N corpus its first N (caption de-duplication is off, so every
video is accepted; repeated captions are embedded once by both pyoco and the baseline).

- *decode*: PyAV decode + resize of exactly the clips pyoco takes (``pyoco.video.decode_clips``), no more;
  with pyoco's default ``shot_aware`` that includes decoding every frame (at <= 64 px) for the cut scan, so
  all three jobs do it (``--no-shot-aware`` turns it off in all three).
  It bounds what any job doing that decode can reach: a job faster than decode on the same cores means a
  broken measurement, and the bench prints a WARNING.
- *baseline*: the same job as pyoco in one plain process: read the tar, decode + resize the clip (shot-aware
  as above) and its motion score, MiniLM
  token states in batches of 64 (each distinct caption once), one zstd parquet of clip rows
  (``pyoco.clips`` schema) per shard. Its row count must equal pyoco's ``clips_written`` (checked).
- *pyoco*: ``run_preprocess`` with its defaults except the clip shape and ``captions.dedupe: none``.
- *nodes*: the loopback token-auth cluster of ``infra/local/services.py``: a head (1 CPU) pinned to core 0,
  plus, for 2 nodes, a worker node (1 CPU) pinned to core 1; the driver runs on core 0 with the head.

Memory is the driver's own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` of the child that calls
``run_preprocess``; Ray's workers are other processes) for the N and the k·N run of pyoco on 2 cores.
Clip counts are exact: every pyoco run checks ``inputs == accepted_videos + Σ rejected`` from its manifest.

Goals (issue 14): per core ≥ 0.9 × baseline; 1 → 2 cores ≥ 1.8×; 1 → 2 nodes ≥ 1.7×; driver peak RSS for
10·N ≤ 1.2 × that for N. The machine is shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMBED_BATCH = 64  # the baseline's MiniLM batch (pyoco's embed_batch_size default)


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import av
    import ray

    return (
        f"nproc {len(os.sched_getaffinity(0))} ({os.cpu_count()} logical), {cpu}; Python "
        f"{platform.python_version()}, ray {ray.__version__}, PyAV {av.__version__}; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )


# ---------------------------------------------------------------------------------------------- corpus
def make_corpus(root: Path, args) -> tuple[Path, Path]:
    """k·N distinct synth videos in ``root/kn`` (k·S shards); the N corpus ``root/n`` is hard links to
    its first S shards, i.e. its first N videos. Distinct videos, not copies: a copy repeats its caption,
    and pyoco's embedder caches repeated captions."""
    from pyoco import synth

    small, big = root / "n", root / "kn"
    if args.videos % args.shards:
        raise SystemExit(f"--videos {args.videos} must be a multiple of --shards {args.shards}")
    stamp = json.dumps([args.videos, args.shards, args.frames, args.size, args.multiplier])
    if (root / "corpus.json").exists() and (root / "corpus.json").read_text() == stamp:
        print(f"corpus: reusing {root}")
        return small, big
    shutil.rmtree(small, ignore_errors=True)
    shutil.rmtree(big, ignore_errors=True)
    t0 = time.perf_counter()
    kn, shards = args.videos * args.multiplier, args.shards * args.multiplier
    synth.write_dataset(
        str(big), videos=kn, shards=shards, seed=0, frames=args.frames, size=args.size, fps=24
    )
    small.mkdir(parents=True)
    for shard in sorted(big.glob("*.tar"))[: args.shards]:
        os.link(shard, small / shard.name)
    (root / "corpus.json").write_text(stamp)
    print(
        f"corpus: N={args.videos} videos ({args.shards} shards) and k·N={kn} ({shards} shards), "
        f"{args.frames} frames at {args.size} px, made in {time.perf_counter() - t0:.1f} s"
    )
    return small, big


# --------------------------------------------------------------------------------------- the child jobs
def _tar_samples(shard: Path) -> list[tuple[str, bytes, str]]:
    """``(key, mp4 bytes, caption)`` of each sample of a WebDataset shard, in member order."""
    import tarfile

    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(k, v["mp4"], v["txt"].decode()) for k, v in members.items() if "mp4" in v]


def _decode(data: bytes, shard: Path, key: str, args):
    from pyoco import video

    return video.decode_clips(
        data,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        size=args.clip_size,
        max_clips=1,
        seed=0,
        key=f"{shard}\0{key}",
        shot_aware=args.shot_aware,  # as pyoco: every frame decoded (at <= 64 px) for the cut scan
    )


def job_decode(args) -> dict:
    """PyAV decode + resize of the clips pyoco takes; nothing else."""
    import av  # noqa: F401 - set-up, not timed

    t0 = time.perf_counter()
    videos = 0
    for shard in sorted(Path(args.input).glob("*.tar")):
        for key, data, _ in _tar_samples(shard):
            _decode(data, shard, key, args)
            videos += 1
    return {"videos": videos, "rows": videos, "t0": t0}


def job_baseline(args) -> dict:
    """The same job as pyoco, hand-written: decode + resize, MiniLM states in batches of 64, one zstd
    parquet of clip rows per shard."""
    import torch

    from pyoco import clips as clipfmt
    from pyoco import shots
    from pyoco.text import load_text_encoder

    torch.set_num_threads(1)
    encoder = load_text_encoder("minilm", max_length=args.text_len)
    encoder.encode(["warm-up"])
    cache: dict[str, tuple] = {}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    videos = rows_written = 0
    for shard in sorted(Path(args.input).glob("*.tar")):
        rows = []
        for key, data, caption in _tar_samples(shard):
            for i, c in enumerate(_decode(data, shard, key, args)):
                t, h, w, _ = c.frames.shape
                rows.append(
                    {
                        "clip_id": f"{shard.name}/{key}/{i}",
                        "source": str(shard),
                        "key": key,
                        "clip_index": i,
                        "start_frame": c.start_frame,
                        "num_frames": t,
                        "fps": c.fps,
                        "height": h,
                        "width": w,
                        "frames": c.frames.tobytes(),
                        "caption": caption,
                        "labels": None,
                        "node_id": "local",
                        clipfmt.MOTION: shots.motion_score(c.frames),  # pyoco's motion column
                    }
                )
            videos += 1
        for start in range(0, len(rows), EMBED_BATCH):
            batch = rows[start : start + EMBED_BATCH]
            # Each caption once, as pyoco's CaptionEmbedder does with its cache of recent captions.
            missing = sorted({r["caption"] for r in batch} - cache.keys())
            if missing:
                emb, mask = encoder.encode(missing)
                cache.update(zip(missing, zip(emb.numpy(), mask.numpy().tolist(), strict=True), strict=True))
            for r in batch:
                r[clipfmt.EMBEDDING], r[clipfmt.MASK] = cache[r["caption"]]
        if rows:
            clipfmt.write_clip_table(rows, str(out / f"{shard.stem}.parquet"))
            rows_written += len(rows)
    return {"videos": videos, "rows": rows_written, "t0": t0}


def _pyoco_config(args):
    from pyoco.config import CaptionFilterConfig, PreprocessConfig

    return PreprocessConfig(
        input=args.input,
        output=args.output,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        size=args.clip_size,
        max_clips_per_video=1,
        text_max_length=args.text_len,
        captions=CaptionFilterConfig(dedupe="none"),
        shot_aware=args.shot_aware,
    )


def job_pyoco(args) -> dict:
    import ray

    from pipelines.preprocess.step import run_preprocess

    if args.address:  # the loopback cluster (token auth from RAY_AUTH_TOKEN_PATH in the environment)
        ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    else:
        from pipelines.context import apply_worker_pool_env

        apply_worker_pool_env()  # as pyoco's own local Ray start does
        ray.init(
            num_cpus=args.cpus,
            resources={"preprocess": args.cpus},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    cfg = _pyoco_config(args)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        os.environ["PYOCO_DATA_STATS"] = "1"
        prof = cProfile.Profile()
        manifest = prof.runcall(run_preprocess, cfg, progress=False)
        t1 = time.perf_counter()
        stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
    else:
        manifest = run_preprocess(cfg, progress=False)
        t1 = time.perf_counter()
    ray.shutdown()
    keys = ("inputs", "accepted_videos", "clips_written", "rejected", "decode_nodes")
    return {"videos": manifest["accepted_videos"], "rows": manifest["clips_written"], "t0": t0, "t1": t1} | {
        k: manifest[k] for k in keys
    }


JOBS = {"decode": job_decode, "baseline": job_baseline, "pyoco": job_pyoco}


def child(args) -> None:
    result = JOBS[args._child](args)
    # Timed from the end of set-up (imports, model load, ray.init) to the end of the work: set-up cancels in
    # the marginal rate anyway, but it is large and noisy on a loaded machine.
    result["elapsed_s"] = result.pop("t1", time.perf_counter()) - result.pop("t0")
    result["driver_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------- the parent
def run_child(
    job: str, corpus: Path, out: Path, cores: list[int], args, *, address=None, env=None, profile=False
) -> dict:
    cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, __file__, "--_child", job]
    cmd += ["--input", str(corpus), "--output", str(out), "--cpus", str(len(cores))]
    cmd += ["--num-frames", str(args.num_frames), "--frame-stride", str(args.frame_stride)]
    cmd += ["--clip-size", str(args.clip_size), "--text-len", str(args.text_len)]
    cmd += ["--address", address] if address else []
    cmd += [] if args.shot_aware else ["--no-shot-aware"]
    cmd += ["--profile"] if profile else []
    run_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), run_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Ray runs its workers at nice 15, the baseline runs at 0: on a machine where anything else runs, that
    # alone would slow pyoco down; same priority for every job.
    run_env["RAY_worker_niceness"] = "0"
    run_env.update(env or {})
    shutil.rmtree(out, ignore_errors=True)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=run_env, cwd=ROOT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{job} run failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["log"] = str(log)
    return result


def _secs(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def measure(name: str, job: str, small: Path, big: Path, cores: list[int], work: Path, args, **kw) -> dict:
    """Run ``job`` on the N and the k·N corpus; the marginal rate and both results."""
    n, kn = args.videos, args.videos * args.multiplier
    # Each corpus `--repeats` times, N and k·N alternating, keeping the fastest of each: noise (another process,
    # a slow Ray start) only ever adds time, so the minimum is the estimate least disturbed by it.
    runs_n, runs_kn = [], []
    for _ in range(max(1, args.repeats)):
        runs_n.append(run_child(job, small, work / f"out-{name}-n", cores, args, **kw))
        runs_kn.append(run_child(job, big, work / f"out-{name}-kn", cores, args, **kw))
    r_n = min(runs_n, key=lambda r: r["elapsed_s"])
    r_kn = min(runs_kn, key=lambda r: r["elapsed_s"])
    r_n["all_s"], r_kn["all_s"] = [r["elapsed_s"] for r in runs_n], [r["elapsed_s"] for r in runs_kn]
    for r, count in [*((r, n) for r in runs_n), *((r, kn) for r in runs_kn)]:
        if r["videos"] != count:
            raise SystemExit(f"{name}: expected {count} videos, got {r['videos']} (see {r['log']})")
        if "inputs" in r and r["inputs"] != r["accepted_videos"] + sum(r["rejected"].values()):
            raise SystemExit(f"{name}: manifest invariant broken: {r}")
    dt = r_kn["elapsed_s"] - r_n["elapsed_s"]
    rate = (kn - n) / dt if dt > 0 else float("nan")
    print(
        f"  {name:<12} cores {','.join(map(str, cores)):<4} t(N)={r_n['elapsed_s']:6.1f} s  "
        f"t(kN)={r_kn['elapsed_s']:6.1f} s  -> {rate:6.2f} videos/s  "
        + (f"(min of t(N) {_secs(r_n['all_s'])}, t(kN) {_secs(r_kn['all_s'])}) " if len(runs_n) > 1 else "")
        + f"(rows {r_n['rows']}/{r_kn['rows']}, driver peak RSS {r_n['driver_maxrss_mib']:.0f}/"
        f"{r_kn['driver_maxrss_mib']:.0f} MiB)"
        + (
            f"  manifest kN: inputs {r_kn['inputs']} = accepted {r_kn['accepted_videos']} + rejected "
            f"{sum(r_kn['rejected'].values())} {r_kn['rejected']}"
            if "inputs" in r_kn
            else ""
        )
    )
    if dt <= 0:
        print(f"WARNING: {name}: t(kN) <= t(N); the measurement is broken (machine load changed?)")
    elif dt < r_n["elapsed_s"]:
        print(
            f"WARNING: {name}: the k·N run took only {dt:.1f} s more than the N run ({r_n['elapsed_s']:.1f} s): "
            "the fixed part dominates and the rate is noise; use a larger --videos/--multiplier"
        )
    return {"rate": rate, "n": r_n, "kn": r_kn, "cores": len(cores)}


def loopback_cluster(workers: int, state_dir: Path):
    """Start the loopback token-auth Ray (head 1 CPU on core 0, ``workers`` nodes of 1 CPU on cores 1..);
    returns (services module, state, driver env)."""
    import importlib.util

    import psutil

    name = "pyoco_local_services"
    spec = importlib.util.spec_from_file_location(name, ROOT / "infra/local/services.py")
    services = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(services)
    stack = services.StackSpec(
        ray=True,
        mlflow=False,
        s3=False,
        workers=workers,
        head_cpus=1,
        worker_cpus=1,
        head_resources={"preprocess": 1},
        worker_resources={"preprocess": 1},
    )
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    os.environ.setdefault("RAY_worker_niceness", "0")  # as in run_child: the baseline's priority
    state = services.start(stack, state_dir)
    recs = [state["ray"]["process"], *state["ray"]["workers"]]
    for core, rec in enumerate(recs):
        root = psutil.Process(rec["pid"])
        for p in [root, *root.children(recursive=True)]:
            try:
                p.cpu_affinity([core])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["ray"]["token_path"],
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    return services, state, env


def measure_nodes(nodes: int, small: Path, big: Path, work: Path, args) -> dict:
    state_dir = work / f"cluster-{nodes}"
    services, state, env = loopback_cluster(nodes - 1, state_dir)
    try:
        return measure(
            f"pyoco-{nodes}node",
            "pyoco",
            small,
            big,
            [0],
            work,
            args,
            address=state["ray"]["address"],
            env=env,
        )
    finally:
        services.stop(state_dir)


def ratio_line(label: str, value: float, goal: str, ok: bool) -> str:
    return f"  {label:<44} {value:7.2f}   {goal:<8} {'ok' if ok else 'MISSED'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="N=20, 32 frames at 128 px: a smoke test of the method"
    )
    ap.add_argument("--videos", type=int, default=60, help="N, videos in the small corpus")
    ap.add_argument("--multiplier", type=int, default=10, help="k: the big corpus has k·N videos")
    ap.add_argument("--frames", type=int, default=64, help="frames per synthesised video")
    ap.add_argument("--size", type=int, default=256, help="synthesised frame size (px)")
    ap.add_argument("--shards", type=int, default=4, help="shards of the N corpus")
    ap.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    ap.add_argument("--frame-stride", type=int, default=2)
    ap.add_argument("--clip-size", type=int, default=64, help="clip frame size (px)")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each corpus per setting; the fastest counts (default 2)",
    )
    ap.add_argument("--no-nodes", dest="nodes", action="store_false", help="skip the 2-node loopback runs")
    ap.add_argument(
        "--no-shot-aware",
        dest="shot_aware",
        action="store_false",
        help="all three jobs without the shot scan (pyoco's default scans every frame for cuts; so do decode "
        "and the baseline unless this is given)",
    )
    ap.add_argument("--profile", action="store_true", help="one extra pyoco k·N run (2 cores), profiled")
    ap.add_argument("--workdir", default=None, help="keep corpora and outputs here (default: a temp dir)")
    ap.add_argument("--_child", choices=sorted(JOBS), help=argparse.SUPPRESS)
    for hidden in ("--input", "--output", "--address"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--cpus", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args)
        return
    if args.quick:
        args.videos, args.frames, args.size = 20, 32, 128

    cores = sorted(os.sched_getaffinity(0))
    print("machine:", machine())
    print("reproduce: .venv/bin/python bench/preprocess.py " + " ".join(sys.argv[1:]))
    print(
        f"method: marginal rate between N={args.videos} and k·N={args.videos * args.multiplier} videos, "
        f"each run a fresh process under taskset; shot-aware {'on' if args.shot_aware else 'off'} in all jobs"
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pyoco-bench-"))
    one, two = cores[:1], cores[:2]
    try:
        small, big = make_corpus(work, args)
        m = {
            "decode": measure("decode", "decode", small, big, one, work, args),
            "baseline": measure("baseline", "baseline", small, big, one, work, args),
            "pyoco-1c": measure("pyoco-1core", "pyoco", small, big, one, work, args),
        }
        if len(two) == 2:
            m["pyoco-2c"] = measure("pyoco-2core", "pyoco", small, big, two, work, args)
        if args.nodes and len(two) == 2:
            try:
                m["node-1"] = measure_nodes(1, small, big, work, args)
                m["node-2"] = measure_nodes(2, small, big, work, args)
            except Exception as err:  # noqa: BLE001 - report and carry on with the rest
                print(
                    f"  loopback cluster runs failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
                )
        if args.profile:
            r = run_child("pyoco", big, work / "out-profile", two, args, profile=True)
            print(
                f"  profile: pyoco 2 cores k·N in {r['elapsed_s']:.1f} s; cProfile + Ray Data stats in {r['log']}"
            )
        print("machine after:", "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))

        base_rows = (m["baseline"]["n"]["rows"], m["baseline"]["kn"]["rows"])
        pyoco_rows = (m["pyoco-1c"]["n"]["rows"], m["pyoco-1c"]["kn"]["rows"])
        if base_rows != pyoco_rows:
            print(f"WARNING: baseline wrote {base_rows} rows, pyoco {pyoco_rows}: not the same job")
        decode, base = m["decode"]["rate"], m["baseline"]["rate"]
        per_core = m["pyoco-1c"]["rate"] / base
        print()
        print("  ratio                                         measured   goal")
        print(f"  bare decode, 1 core: {decode:.2f} videos/s; baseline script, 1 core: {base:.2f} videos/s")
        print(ratio_line("pyoco per core / baseline (1 core)", per_core, ">= 0.9", per_core >= 0.9))
        print(ratio_line("pyoco 1 core / bare decode", m["pyoco-1c"]["rate"] / decode, "<= 1", True))
        for name in ("baseline", "pyoco-1c"):
            if m[name]["rate"] > 1.05 * decode:
                print(
                    f"WARNING: {name} is faster than bare decode on the same core: the measurement is broken"
                )
        if per_core > 1.2:
            print(
                "WARNING: pyoco beats the same-job baseline by > 20 %: the jobs differ or the figures are noise"
            )
        if "pyoco-2c" in m:
            scaling = m["pyoco-2c"]["rate"] / m["pyoco-1c"]["rate"]
            print(ratio_line("pyoco 2 cores / 1 core", scaling, ">= 1.8", scaling >= 1.8))
            if m["pyoco-2c"]["rate"] / 2 > 1.05 * decode:
                print("WARNING: pyoco per core on 2 cores beats bare decode on 1: the measurement is broken")
            if scaling < 1:
                print("WARNING: 2 cores slower than 1: the measurement is broken (pinning? load?)")
            mem_n, mem_kn = (m["pyoco-2c"][s]["driver_maxrss_mib"] for s in ("n", "kn"))
            mem = mem_kn / mem_n
            print(
                ratio_line(
                    f"driver peak RSS {args.multiplier}·N / N ({mem_n:.0f}, {mem_kn:.0f} MiB)",
                    mem,
                    "<= 1.2",
                    mem <= 1.2,
                )
            )
        if "node-2" in m:
            nodes = m["node-2"]["rate"] / m["node-1"]["rate"]
            print(ratio_line("pyoco 2 loopback nodes / 1 node", nodes, ">= 1.7", nodes >= 1.7))
            if nodes < 1:
                print("WARNING: 2 nodes slower than 1: the measurement is broken (pinning? load?)")
            print(f"  decode nodes, 2-node k·N run: {m['node-2']['kn'].get('decode_nodes')}")
        elif args.nodes:
            print("  1 → 2 loopback nodes: not measured (see above)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
