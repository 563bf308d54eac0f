"""Preprocess benchmark: bare PyAV decode vs the Ray Data pipeline, scaling 1 → 2 CPUs, memory for N vs 4N.

    python bench/preprocess.py                       # defaults: 200 videos, 128 frames, 256 px
    python bench/preprocess.py --videos 40 --frames 64 --size 128     # quicker

It measures, in one run:
  (a) bare decode: one process decoding + resizing exactly the clips the pipeline takes (videos/s);
  (b) `run_preprocess` steady-state throughput with 1 and with 2 CPUs. Each CPU count runs a corpus of N
      and one of M*N videos (M = --multiplier, default 4) in a fresh Ray; after Ray start-up the whole run
      (driver, raylet, workers, actors) is pinned to that many cores, so the 1-CPU run can't borrow the
      other core for its overheads (--no-pin lifts that). Throughput is the rate within the M*N run between
      the moments 20 % and 90 % of its videos had come back (start-up, index barrier and tail excluded),
      cross-checked by (M*N - N) / (t(M*N) - t(N)), which a change in machine load between runs skews;
  (c) peak memory, RSS summed over the driver and every Ray process (sampled every 0.2 s), for N and M*N
      videos (with the highest CPU count). PSS is printed as well (RSS counts shared object-store pages
      once per process that maps them).

The M*N corpus is M renamed copies of the N shards (same decode work per video), with caption
de-duplication off so every copy is a distinct accepted input.

Ratios and goals (issue 3): per-core throughput / bare ≥ 0.75; 2-CPU / 1-CPU throughput ≥ 1.7;
peak RSS(M*N) / peak RSS(N) ≤ 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import av
    import ray

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
        f"Python {platform.python_version()}, ray {ray.__version__}, PyAV {av.__version__}; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )


# ---------------------------------------------------------------------------------------------- corpus
def make_corpus(root: Path, args) -> tuple[Path, Path]:
    from pyoco import synth

    small = root / "n"
    big = root / "mn"
    stamp = f"{args.videos} {args.shards} {args.frames} {args.size} {args.multiplier}"
    if (root / "corpus.txt").exists() and (root / "corpus.txt").read_text() == stamp:
        print(f"corpus: reusing {root} ({stamp})")
        return small, big
    shutil.rmtree(small, ignore_errors=True)
    shutil.rmtree(big, ignore_errors=True)
    t0 = time.perf_counter()
    synth.write_dataset(
        str(small), videos=args.videos, shards=args.shards, seed=0, frames=args.frames, size=args.size, fps=24
    )
    big.mkdir(parents=True)
    for copy in range(args.multiplier):
        for shard in sorted(small.glob("*.tar")):
            os.link(shard, big / f"copy{copy}-{shard.name}")
    (root / "corpus.txt").write_text(stamp)
    print(
        f"corpus: {args.videos} videos x {args.frames} frames at {args.size} px in {time.perf_counter() - t0:.1f} s"
    )
    return small, big


def bare_decode(small: Path, args) -> float:
    """Videos/s of a single process decoding the same clips (tar members read into memory first)."""
    import tarfile

    from pyoco import video

    blobs = []
    for shard in sorted(small.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".mp4"):
                    blobs.append((str(shard), m.name.rsplit(".", 1)[0], tar.extractfile(m).read()))
    t0 = time.perf_counter()
    for source, key, data in blobs:
        video.decode_clips(
            data,
            num_frames=args.num_frames,
            frame_stride=args.frame_stride,
            size=args.clip_size,
            max_clips=1,
            seed=0,
            key=f"{source}\0{key}",
        )
    return len(blobs) / (time.perf_counter() - t0)


def bare_decode_pinned(small: Path, args) -> float:
    if not args.pin or not hasattr(os, "sched_setaffinity"):
        return bare_decode(small, args)
    saved = os.sched_getaffinity(0)
    try:
        pin(1)
        return bare_decode(small, args)
    finally:
        os.sched_setaffinity(0, saved)


# ------------------------------------------------------------------------------------------ pipeline run
def preprocess_config(input: str, output: str, args):
    from pyoco.config import CaptionFilterConfig, PreprocessConfig

    return PreprocessConfig(
        input=input,
        output=output,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        size=args.clip_size,
        max_clips_per_video=1,
        videos_per_task=args.videos_per_task,
        # Small files so that videos come back to the driver steadily (the in-run rate needs many marks).
        rows_per_file=args.videos_per_task * 2,
        captions=CaptionFilterConfig(dedupe="none"),
    )


def pin(cpus: int, *, tree: bool = False) -> str:
    """Pin this process (with ``tree``: and every process it has started, e.g. Ray's GCS and raylet, whose
    later workers and actors inherit it) to the first ``cpus`` cores, so that "k CPUs" means k cores for
    the whole pipeline, driver and Ray services included."""
    import psutil

    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < cpus:
        return "not pinned"
    cores = sorted(os.sched_getaffinity(0))[:cpus]
    procs = [psutil.Process()] + (psutil.Process().children(recursive=True) if tree else [])
    for p in procs:
        try:
            p.cpu_affinity(cores)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return f"pinned to cores {cores}"


def child_run(args) -> None:
    """In a fresh process: start Ray with --cpus, run the step, print JSON timing."""
    import ray

    from pipelines.preprocess.step import run_preprocess

    ray.init(
        num_cpus=args.cpus,
        resources={"preprocess": args.cpus},
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    if args.pin:  # after start-up (which is not measured): an overloaded single core can time it out
        pin(args.cpus, tree=True)
    cfg = preprocess_config(args.input, args.output, args)
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    manifest = run_preprocess(
        cfg, progress=False, on_progress=lambda done, total: marks.append((time.perf_counter(), done))
    )
    elapsed = time.perf_counter() - t0
    ray.shutdown()
    print(
        "RESULT "
        + json.dumps(
            {"elapsed_s": elapsed, "accepted": manifest["accepted_videos"], "steady": steady_rate(marks)}
        )
    )


def steady_rate(marks: list[tuple[float, int]], lo: float = 0.2, hi: float = 0.9) -> float | None:
    """Videos/s between the moments 20 % and 90 % of the videos had come back (start-up and tail excluded)."""
    if not marks:
        return None
    total = marks[-1][1]
    a = next((m for m in marks if m[1] >= lo * total), None)
    b = next((m for m in marks if m[1] >= hi * total), None)
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def _tree_memory(pid: int) -> tuple[int, int]:
    import psutil

    rss = pss = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, pss


def run_pipeline(input: Path, output: Path, cpus: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", "--cpus", str(cpus), "--input", str(input)]
    cmd += ["--output", str(output), "--num-frames", str(args.num_frames)]
    cmd += ["--frame-stride", str(args.frame_stride), "--clip-size", str(args.clip_size)]
    cmd += ["--videos-per-task", str(args.videos_per_task), "--pin" if args.pin else "--no-pin"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = output.parent / f"{output.name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        peak = {"rss": 0, "pss": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rss, pss = _tree_memory(proc.pid)
                peak["rss"] = max(peak["rss"], rss)
                peak["pss"] = max(peak["pss"], pss)
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"pipeline run failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result.update(peak_rss=peak["rss"], peak_pss=peak["pss"])
    return result


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=200, help="N, videos in the small corpus")
    ap.add_argument("--frames", type=int, default=128, help="frames per synthesised video")
    ap.add_argument("--size", type=int, default=256, help="synthesised frame size (px)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--multiplier", type=int, default=4, help="M: the big corpus has M*N videos")
    ap.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    ap.add_argument("--frame-stride", type=int, default=2)
    ap.add_argument("--clip-size", type=int, default=64, help="clip frame size (px)")
    ap.add_argument("--videos-per-task", type=int, default=8)
    ap.add_argument("--cpus", default="1,2", help="CPU counts to compare (first is the baseline)")
    ap.add_argument(
        "--workdir", default=None, help="keep corpora/outputs here and reuse the corpus (default: a temp dir)"
    )
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="don't pin a k-CPU run (driver + all Ray processes) and the bare decode to k cores",
    )
    ap.add_argument("--pin", dest="pin", action="store_true", help=argparse.SUPPRESS)
    ap.set_defaults(pin=True)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        args.cpus = int(args.cpus)
        child_run(args)
        return

    cpus = [int(c) for c in args.cpus.split(",")]
    print("machine:", machine())
    print("reproduce: python bench/preprocess.py " + " ".join(sys.argv[1:]))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pyoco-bench-"))
    try:
        small, big = make_corpus(work, args)
        n, mn = args.videos, args.videos * args.multiplier
        bare = bare_decode_pinned(small, args)
        print(
            f"(a) bare decode+resize, 1 process ({'1 core' if args.pin else 'not pinned'}): {bare:.2f} videos/s"
        )
        runs: dict[int, dict[str, dict]] = {}
        for c in cpus:
            runs[c] = {}
            for name, corpus, count in (("n", small, n), ("mn", big, mn)):
                r = run_pipeline(corpus, work / f"out-{c}-{name}", c, args)
                assert r["accepted"] == count, f"expected {count} accepted, got {r['accepted']}"
                runs[c][name] = r
                print(
                    f"    {c} CPU, {count:5d} videos: {r['elapsed_s']:7.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB, "
                    f"PSS {r['peak_pss'] / 2**30:.2f} GiB"
                )
        diff = {c: (mn - n) / (runs[c]["mn"]["elapsed_s"] - runs[c]["n"]["elapsed_s"]) for c in cpus}
        steady = {c: runs[c]["mn"]["steady"] for c in cpus}
        for c in cpus:
            print(
                f"(b) steady-state throughput, {c} CPU: {steady[c]:.2f} videos/s within the {mn}-video run "
                f"(20-90 % of videos); {diff[c]:.2f} videos/s from t({mn}) - t({n})"
            )
        thr = steady
        top = cpus[-1]
        mem_n, mem_mn = runs[top]["n"]["peak_rss"], runs[top]["mn"]["peak_rss"]
        pss_ratio = runs[top]["mn"]["peak_pss"] / runs[top]["n"]["peak_pss"]
        print(
            f"(c) peak RSS, {top} CPU: {mem_n / 2**30:.2f} GiB for {n}, {mem_mn / 2**30:.2f} GiB for {mn} videos"
        )

        per_core = thr[cpus[0]] / cpus[0] / bare
        scaling = thr[top] / thr[cpus[0]]
        memory = mem_mn / mem_n
        print()
        print("ratio                                   measured   goal")
        print(
            f"per-core throughput / bare decode        {per_core:8.2f}   >= 0.75  {'ok' if per_core >= 0.75 else 'MISSED'}"
        )
        print(
            f"throughput {top} CPU / {cpus[0]} CPU                {scaling:8.2f}   >= 1.7   {'ok' if scaling >= 1.7 else 'MISSED'}"
        )
        print(
            f"peak RSS {args.multiplier}x videos / 1x                 {memory:8.2f}   <= 1.2   {'ok' if memory <= 1.2 else 'MISSED'}"
        )
        print(f"(peak PSS ratio, for reference: {pss_ratio:.2f})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
