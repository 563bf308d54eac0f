"""Input discovery: the step's settings, index rows, and the input plan of a shards glob, a captioned
folder or UCF-101 class folders."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from typing import Any

from pipelines.common import PyocoError
from pipelines.preprocess.ledger import STAGE_CAPTION, STAGE_READ
from pipelines.preprocess.schemas import _reject, _row
from pyoco.config import PreprocessConfig

VIDEO_EXTS = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "gif", "mpg", "mpeg", "ogv", "wmv", "flv", "ts")
CAPTION_EXTS = ("txt", "caption", "cap", "text")
CAPTION_FILES = ("captions.csv", "captions.jsonl")


def _safe_key_text(name: str) -> str:
    return name.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


def is_unsafe_member_name(name: str) -> bool:
    """Absolute paths, ``..`` components, drive letters, NUL bytes: never used as a path, rejected."""
    if not name or "\x00" in name:
        return True
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[a-zA-Z]:", norm):
        return True
    return any(part == ".." for part in norm.split("/"))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/abc.seg.mp4`` → key ``dir/abc``, extension ``seg.mp4``."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    if m is None:
        return name, ""
    return m.group(1), m.group(2)


def _last_ext(ext: str) -> str:
    return ext.lower().rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the Ray stages need from the config, as a small picklable object."""

    num_frames: int
    frame_stride: int
    target_fps: float | None
    size: int
    max_clips: int
    seed: int
    decode_threads: int
    text_encoder: str
    text_len: int
    caption_rules: dict
    max_caption_bytes: int
    shot_aware: bool = True
    min_motion: float = 0.0
    max_jitter_px: float | None = None

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> StepSettings:
        return cls(
            num_frames=cfg.num_frames,
            frame_stride=cfg.frame_stride,
            target_fps=cfg.target_fps,
            size=cfg.size,
            max_clips=cfg.max_clips_per_video,
            seed=cfg.seed,
            decode_threads=cfg.decode_threads,
            text_encoder=cfg.text_encoder,
            text_len=cfg.text_max_length,
            caption_rules=cfg.captions.model_dump(),
            max_caption_bytes=4 * cfg.captions.max_chars + 64,
            shot_aware=cfg.shot_aware,
            min_motion=cfg.min_motion,
            max_jitter_px=cfg.max_jitter_px,
        )

    def caption_filter(self):
        from pyoco.captions import CaptionFilter

        r = self.caption_rules
        return CaptionFilter(
            min_words=r["min_words"],
            max_words=r["max_words"],
            max_chars=r["max_chars"],
            min_letter_fraction=r["min_letter_fraction"],
            blocklist=r["blocklist"],
            dedupe=r["dedupe"],
        )


def _apply_caption(row: dict, raw: Any, settings: StepSettings, cf) -> dict:
    from pyoco.captions import dedupe_key

    res = cf.check(raw)
    if not res.ok:
        row.update(reason=res.reason, stage=STAGE_CAPTION, detail=res.detail[:500])
        return row
    row["caption"] = res.text
    row["dedupe_key"] = dedupe_key(res.text, settings.caption_rules["dedupe"])
    return row


# ------------------------------------------------------------------------------------------ input discovery
@dataclasses.dataclass
class InputPlan:
    kind: str  # webdataset | folder | ucf101
    shards: list[str] = dataclasses.field(default_factory=list)  # webdataset
    rows: list[dict] = dataclasses.field(default_factory=list)  # folder/ucf101: ready index rows
    ignored: int = 0  # files under the input that are not inputs of this kind


def _video_ext(uri: str) -> bool:
    return (
        _last_ext(uri.rsplit("/", 1)[-1].rsplit(".", 1)[-1]) in VIDEO_EXTS and "." in uri.rsplit("/", 1)[-1]
    )


def discover_inputs(uri: str, fmt: str, settings: StepSettings, options) -> InputPlan:
    """Find the inputs (listing only). Folder/UCF-101 captions are read and checked here, on the driver."""
    from pyoco import storage

    if storage.has_glob(uri):
        files = storage.glob_uris(uri, options=options)
        if not files:
            raise FileNotFoundError(f"{uri}: the glob matches no file")
        if fmt in ("auto", "webdataset"):
            return InputPlan("webdataset", shards=files)
        raise PyocoError(f"--input {uri}: a glob selects WebDataset shards; format {fmt!r} needs a folder")
    files = storage.list_files(uri, options=options)
    if not files:
        raise FileNotFoundError(f"{uri}: no files found")
    base = uri.rstrip("/")
    rel = {f: f[len(base) :].lstrip("/") if f.startswith(base) else f.rsplit("/", 1)[-1] for f in files}
    top = {r: f for f, r in rel.items() if "/" not in r}
    if fmt == "auto":
        if len(files) == 1 and files[0].lower().endswith(".tar") and rel[files[0]] in ("", files[0]):
            fmt = "webdataset"
        elif any(name in top for name in CAPTION_FILES):
            fmt = "folder"
        elif any(f.lower().endswith(".tar") for f in files):
            fmt = "webdataset"
        elif any(_video_ext(f) and rel[f].count("/") == 1 for f in files):
            fmt = "ucf101"
        else:
            raise PyocoError(
                f"--input {uri}: can't tell the format (no .tar shards, no captions.csv/.jsonl, no class "
                "folders of videos); set preprocess.format"
            )
    if fmt == "webdataset":
        shards = [f for f in files if f.lower().endswith(".tar")]
        if not shards:
            raise FileNotFoundError(f"{uri}: no .tar shards found")
        return InputPlan("webdataset", shards=shards, ignored=len(files) - len(shards))
    if fmt == "folder":
        return _plan_folder(base, files, rel, top, settings, options)
    if fmt == "ucf101":
        return _plan_ucf101(files, rel, settings)
    raise PyocoError(f"unknown format {fmt!r}")


def _read_caption_table(uri: str, options) -> list[tuple[str, Any, str]]:
    """``[(file, caption or bytes, where)]`` from captions.csv (columns file/path/video + caption/text)
    or captions.jsonl (keys likewise); unreadable lines become entries with ``caption=None``."""
    import csv

    from pyoco import storage

    data = storage.read_bytes(uri, options=options)
    out: list[tuple[str, Any, str]] = []
    name_keys = ("file", "path", "video", "filename", "name")
    cap_keys = ("caption", "text", "prompt")
    if uri.lower().endswith(".jsonl"):
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise PyocoError(f"{uri} line {lineno}: not JSON ({err})") from None
            name = next((obj[k] for k in name_keys if k in obj), None)
            if name is None:
                raise PyocoError(f"{uri} line {lineno}: no file/path/video field")
            out.append((str(name), next((obj[k] for k in cap_keys if k in obj), None), f"line {lineno}"))
        return out
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PyocoError(f"{uri}: not UTF-8 ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.lower() for f in (reader.fieldnames or [])]
    name_col = next((f for f in (reader.fieldnames or []) if f.lower() in name_keys), None)
    cap_col = next((f for f in (reader.fieldnames or []) if f.lower() in cap_keys), None)
    if name_col is None or cap_col is None:
        raise PyocoError(f"{uri}: needs a file column and a caption column (has {fields})")
    for lineno, rec in enumerate(reader, 2):
        out.append((str(rec.get(name_col) or ""), rec.get(cap_col), f"line {lineno}"))
    return out


def _plan_folder(base, files, rel, top, settings: StepSettings, options) -> InputPlan:
    from pyoco import storage

    cap_uri = top.get("captions.jsonl") or top.get("captions.csv")
    entries = _read_caption_table(cap_uri, options)
    videos = {rel[f]: f for f in files if _video_ext(f)}
    cf = settings.caption_filter()
    rows: list[dict] = []
    seen: set[str] = set()
    for name, caption, where in entries:
        source = storage.join(base, name) if name else cap_uri
        key = name or f"<{where}>"
        if key in seen:
            rows.append(
                _reject(source, f"{key} ({where})", STAGE_READ, "duplicate_entry", f"listed again at {where}")
            )
            continue
        seen.add(key)
        if not name or is_unsafe_member_name(name):
            rows.append(
                _reject(source, _safe_key_text(key), STAGE_READ, "unsafe_path", f"file name {name!r}")
            )
            continue
        if name not in videos:
            rows.append(
                _reject(source, key, STAGE_READ, "missing_video", f"{where} names a file that isn't there")
            )
            continue
        row = _row(source, key, video_uri=videos[name])
        rows.append(_apply_caption(row, caption, settings, cf))
    for name, uri in sorted(videos.items()):
        if name not in seen:
            rows.append(
                _reject(uri, name, STAGE_CAPTION, "caption_missing", "not listed in the captions file")
            )
    ignored = len(files) - len(videos) - 1
    return InputPlan("folder", rows=rows, ignored=ignored)


def _plan_ucf101(files, rel, settings: StepSettings) -> InputPlan:
    from pyoco.captions import class_name_caption

    cf = settings.caption_filter()
    rows = []
    n_videos = 0
    for f in files:
        r = rel[f]
        if not _video_ext(f) or r.count("/") != 1:
            continue
        n_videos += 1
        cls = r.split("/", 1)[0]
        row = _row(f, r, video_uri=f, labels=json.dumps({"class": cls}))
        rows.append(_apply_caption(row, class_name_caption(cls), settings, cf))
    if not rows:
        raise FileNotFoundError("no videos in class folders (expected ROOT/ClassName/video.ext)")
    return InputPlan("ucf101", rows=rows, ignored=len(files) - n_videos)
