"""Helpers for the data tests: the malformed-input corpus, a TCP proxy that can drop every connection for
a few seconds (an S3 outage), and small video builders. Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import io
import os
import socket
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from pyoco import synth, video


# ------------------------------------------------------------------------------------------------- videos
def smooth_frames(num_frames: int = 16, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): smooth moving gradients plus a moving square (what codecs handle well)."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        for c in range(3):
            out[t, :, :, c] = 128 + 90 * np.sin(xx / 11.0 + yy / 17.0 * (c + 1) + phase[c] + t * 0.2)
        x0 = 4 + 2 * t % max(1, width - 12)
        out[t, 10:20, x0 : x0 + 8] = (250, 40, 40)
    return out


def audio_only_mp4(seconds: float = 0.5) -> bytes:
    """An mp4 with one AAC audio stream and no video."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        n = int(16000 * seconds)
        samples = (0.2 * np.sin(np.arange(n) / 16000 * 2 * np.pi * 440)).astype(np.float32)[None, :]
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, n, frame_size):
            chunk = samples[:, start : start + frame_size]
            if chunk.shape[1] < frame_size:
                chunk = np.pad(chunk, ((0, 0), (0, frame_size - chunk.shape[1])))
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return buf.getvalue()


def shape_video(index: int, *, frames: int = 12, size: int = 32, fmt: str = "mp4") -> bytes:
    spec = synth.make_spec(index, seed=123, frames=frames, size=size, fps=8)
    return video.encode_video(synth.render(spec), 8, format=fmt)


# ------------------------------------------------------------------------------------------------ corpus
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def build_bad_corpus(root: Path, *, frames: int = 12, size: int = 32) -> dict[tuple[str, str], str]:
    """Write the malformed corpus as WebDataset shards under ``root``.

    Returns ``{(shard file name, key): expected outcome}`` where the outcome is ``"accepted"`` or the reject
    reason. Keys of shard-level damage are matched by prefix (``"<damaged"``) or are ``""``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    good = shape_video(0, frames=frames, size=size)
    expected: dict[tuple[str, str], str] = {}

    # mixed.tar: one sample per bad-input case.
    samples = [
        ("good", good, "a red circle moves to the left", "accepted"),
        ("zero", b"", "a blue square moves up", "empty_file"),
        (
            "random",
            rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "a green ball moves down",
            "decode_error",
        ),
        (
            "truncated",
            shape_video(1, frames=frames, size=size)[: len(good) // 2],
            "a purple square goes up",
            "decode_error",
        ),
        ("audio", audio_only_mp4(), "a triangle drifts to the right", "no_video_stream"),
        ("oneframe", shape_video(2, frames=1, size=size), "a single yellow frame here", "too_short"),
        (
            "webm",
            shape_video(3, frames=frames, size=size, fmt="webm"),
            "an orange triangle slides left",
            "accepted",
        ),
        (
            "mkv",
            shape_video(4, frames=frames, size=size, fmt="matroska"),
            "a white circle moving right",
            "accepted",
        ),
        ("badutf8", good, b"a red \xff\xfe circle \xc3\x28 moves", "caption_invalid_utf8"),
        ("emptycap", good, "   \n\t ", "caption_empty"),
        ("longcap", good, "word " * 4000, "caption_too_long"),
        ("html", good, "<div class='x'>a red circle</div> <script>alert(1)</script>", "caption_html"),
        ("dup1", shape_video(5, frames=frames, size=size), "A blue circle moves to the right.", "accepted"),
        (
            "dup2",
            shape_video(6, frames=frames, size=size),
            "a blue circle moves to the RIGHT",
            "duplicate_caption",
        ),
    ]
    with tarfile.open(root / "mixed.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, vid, cap, outcome in samples:
            ext = "webm" if key == "webm" else "mkv" if key == "mkv" else "mp4"
            _add(tar, f"{key}.{ext}", vid)
            _add(tar, f"{key}.txt", cap if isinstance(cap, bytes) else cap.encode())
            expected[("mixed.tar", key)] = outcome
        _add(tar, "nocap.mp4", shape_video(7, frames=frames, size=size))
        expected[("mixed.tar", "nocap")] = "caption_missing"
        _add(tar, "orphan.txt", b"a caption without any video")
        expected[("mixed.tar", "orphan")] = "missing_video"
        # Unsafe member names: never written anywhere, rejected.
        _add(tar, "../evil.mp4", good)
        _add(tar, "../evil.txt", b"an evil red circle escapes")
        expected[("mixed.tar", "../evil")] = "unsafe_path"
        _add(tar, "/abs/evil2.mp4", good)
        _add(tar, "/abs/evil2.txt", b"an absolute blue square")
        expected[("mixed.tar", "/abs/evil2")] = "unsafe_path"

    # truncated.tar: three samples, cut in the middle of the third video.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, cap in enumerate(
            ["a green square moves down", "a red triangle moves up", "a blue circle goes left"]
        ):
            _add(tar, f"t{i}.mp4", shape_video(10 + i, frames=frames, size=size))
            _add(tar, f"t{i}.txt", cap.encode())
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = [m for m in tar.getmembers() if m.name == "t2.mp4"][0]
    (root / "truncated.tar").write_bytes(data[: third.offset_data + third.size // 2])
    expected[("truncated.tar", "t0")] = "accepted"
    expected[("truncated.tar", "t1")] = "accepted"
    expected[("truncated.tar", "t2")] = "truncated_tar"

    # notatar.tar: a shard that is not a tar at all.
    (root / "notatar.tar").write_bytes(b"this is not a tar file\n" * 100)
    expected[("notatar.tar", "")] = "not_a_tar"
    return expected


# ------------------------------------------------------------------------------------------ flaky proxy
class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port`` that, once ``trigger_bytes`` bytes have come back
    from the target, drops every open connection (RST) and refuses new ones for ``outage_s`` seconds."""

    def __init__(self, target_port: int, *, trigger_bytes: int | None = None, outage_s: float = 3.0):
        self.target_port = target_port
        self.trigger_bytes = trigger_bytes
        self.outage_s = outage_s
        self.bytes_from_target = 0
        self.outages = 0
        self.dropped = 0  # open connections reset when the outage began
        self.refused = 0  # connection attempts reset during the outage
        self.down_until = 0.0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="flaky-proxy", daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()
        with self._lock:
            for s in list(self._conns):
                _reset(s)
            self._conns.clear()

    @property
    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.is_down:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_target: bool) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if from_target:
                    with self._lock:
                        self.bytes_from_target += len(data)
                        fire = (
                            self.trigger_bytes is not None
                            and self.outages == 0
                            and self.bytes_from_target >= self.trigger_bytes
                        )
                    if fire:
                        # Forward part of this chunk so the client is cut off mid-body, then drop everything.
                        dst.sendall(data[: len(data) // 2])
                        self._begin_outage()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def _begin_outage(self) -> None:
        with self._lock:
            self.outages += 1
            self.down_until = time.monotonic() + self.outage_s
            victims = list(self._conns)
            self._conns.clear()
        self.dropped += len(victims) // 2 or 1
        for s in victims:
            _reset(s)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:  # shutdown first: close() alone neither wakes a thread blocked in recv() nor tells the peer
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def env_without_ray() -> dict[str, str]:
    """This process's environment minus Ray connection settings (for child processes that start Ray)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


# ------------------------------------------------------------------------------------------ 2-node cluster
def two_node_main(config_json: str, out_json: str) -> None:
    """Run in a fresh process: a 2-node local Ray cluster (each node 1 CPU + the ``preprocess`` resource),
    preprocess on it, write the manifest plus the cluster's node ids to ``out_json``."""
    import json

    import ray
    from ray.cluster_utils import Cluster

    from pipelines.preprocess.step import run_preprocess
    from pyoco.config import PreprocessConfig

    cfg = PreprocessConfig.model_validate(json.loads(config_json))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"preprocess": 1}, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, resources={"preprocess": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        manifest = run_preprocess(cfg, progress=False)
        Path(out_json).write_text(json.dumps({"manifest": manifest, "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def truncated_in_first_frame_mp4() -> bytes:
    """An mp4 cut off inside its header, where FFmpeg still lists a video stream but never set up its codec
    (PyAV's ``stream.codec_context`` is None). Found by cutting a real encoded clip byte by byte, so the
    fixture follows whatever layout the encoder writes; asserts that such a cut exists."""
    import av

    data = shape_video(1, frames=12, size=32)
    for cut in range(8, len(data), 4):
        try:
            with av.open(io.BytesIO(data[:cut]), metadata_errors="ignore") as c:
                streams = [s for s in c.streams if s.type == "video"]
                if streams and streams[0].codec_context is None:
                    return data[:cut]
        except (av.error.FFmpegError, EOFError, OSError):
            continue
    raise AssertionError("no cut of the fixture mp4 leaves a video stream without a codec context")
