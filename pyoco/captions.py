"""Caption cleaning and filtering. Every rule returns a stable reason code; nothing is dropped silently.

    f = CaptionFilter(min_words=2, max_words=77, blocklist=["nsfw"])
    result = f.check(raw_bytes_or_str)     # CaptionResult(text=cleaned, reason=None | "caption_...", detail)
    dedupe_key(result.text, "normalized")  # equal for captions that differ only in case/punctuation/space

Reason codes (stable; they appear in ``rejects/`` and in the manifest):

=========================  ===============================================================================
``caption_missing``        the sample has no caption at all
``caption_invalid_utf8``   the bytes are not UTF-8
``caption_empty``          nothing left after cleaning
``caption_too_long``       more than ``max_chars`` characters (checked before anything costly)
``caption_html``           contains HTML/XML markup
``caption_url``            contains a URL or a bare domain name
``caption_boilerplate``    stock-site / social-media boilerplate ("click here", "all rights reserved", ...)
``caption_blocklist``      contains a configured blocklisted word or phrase (whole-word, case-insensitive)
``caption_too_few_words``  fewer than ``min_words`` words
``caption_too_many_words`` more than ``max_words`` words
``caption_non_letters``    fewer than ``min_letter_fraction`` of the non-space characters are letters
``duplicate_caption``      same caption as an earlier sample (exact or normalised; see :func:`dedupe_key`)
=========================  ===============================================================================

Rules run in the order of the table, and the first that fires is the reason.
Cleaning (applied before the rules): Unicode NFKC, HTML entities unescaped (``&amp;`` → ``&``), control
characters removed, whitespace collapsed, surrounding quotes and spaces stripped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import re
import unicodedata
from collections.abc import Iterable

from pyoco.errors import InputError

REASONS = (
    "caption_missing",
    "caption_invalid_utf8",
    "caption_empty",
    "caption_too_long",
    "caption_html",
    "caption_url",
    "caption_boilerplate",
    "caption_blocklist",
    "caption_too_few_words",
    "caption_too_many_words",
    "caption_non_letters",
    "duplicate_caption",
)

_HTML_RE = re.compile(r"<\s*/?\s*[a-zA-Z][a-zA-Z0-9:-]*(\s[^<>]*)?/?\s*>|<!--|-->|<!doctype", re.IGNORECASE)
_URL_RE = re.compile(
    r"(https?://|ftp://|www\.)\S+|\b[a-z0-9-]+(\.[a-z0-9-]+)*\.(com|net|org|io|ly|co|tv|info|biz|ru|de|uk)\b(/\S*)?",
    re.IGNORECASE,
)
BOILERPLATE = (
    "click here",
    "subscribe",
    "all rights reserved",
    "copyright",
    "stock footage",
    "stock video",
    "royalty free",
    "royalty-free",
    "watermark",
    "lorem ipsum",
    "follow us",
    "like and share",
    "download now",
    "buy now",
    "shutterstock",
    "getty images",
    "pond5",
    "istock",
    "no description",
    "untitled",
)
_BOILERPLATE_RE = re.compile(r"\b(" + "|".join(re.escape(b) for b in BOILERPLATE) + r")\b", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b-\u200f\u2028\u2029\ufeff]")
_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class CaptionResult:
    text: str  # cleaned caption ("" when it could not be decoded)
    reason: str | None = None  # None: accepted
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str | None, str]:
    """``(text, reason, detail)``: bytes must be UTF-8 (a BOM is dropped)."""
    if raw is None:
        return None, "caption_missing", "no caption for this sample"
    if isinstance(raw, str):
        return raw, None, ""
    try:
        return bytes(raw).decode("utf-8-sig"), None, ""
    except UnicodeDecodeError as err:
        return None, "caption_invalid_utf8", f"byte {err.start}: {err.reason}"


def clean_caption(text: str) -> str:
    """NFKC, unescape HTML entities, drop control characters, collapse whitespace, strip quotes."""
    text = unicodedata.normalize("NFKC", text)
    text = html.unescape(text)
    text = _CONTROL_RE.sub(" ", text)
    text = _WS_RE.sub(" ", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def normalize(text: str) -> str:
    """The normalised form used for duplicate detection: casefolded words joined by single spaces."""
    return " ".join(w.casefold() for w in words(unicodedata.normalize("NFKC", text)))


def dedupe_key(text: str, mode: str = "normalized") -> str | None:
    """A short hash for duplicate detection, or None when ``mode == "none"``."""
    if mode == "none":
        return None
    if mode == "exact":
        basis = text
    elif mode == "normalized":
        basis = normalize(text)
    else:
        raise InputError(f"dedupe mode must be none, exact or normalized (got {mode!r})")
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()[:32]


def class_name_caption(name: str) -> str:
    """UCF-101 class folder to caption: ``ApplyEyeMakeup`` → ``apply eye makeup``, ``YoYo`` → ``yo yo``."""
    name = name.replace("_", " ").replace("-", " ")
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return _WS_RE.sub(" ", spaced).strip().lower()


class CaptionFilter:
    """The rules of the module doc with their thresholds. ``check`` is pure and cheap."""

    def __init__(
        self,
        *,
        min_words: int = 2,
        max_words: int = 77,
        max_chars: int = 1000,
        min_letter_fraction: float = 0.5,
        blocklist: Iterable[str] = (),
        dedupe: str = "normalized",
    ):
        self.min_words = min_words
        self.max_words = max_words
        self.max_chars = max_chars
        self.min_letter_fraction = min_letter_fraction
        self.blocklist = tuple(b.strip().lower() for b in blocklist if b.strip())
        self.dedupe = dedupe
        dedupe_key("", dedupe)  # validate the mode now
        self._block_re = (
            re.compile(
                r"(?<!\w)(" + "|".join(re.escape(b) for b in self.blocklist) + r")(?!\w)", re.IGNORECASE
            )
            if self.blocklist
            else None
        )

    @classmethod
    def from_config(cls, cfg) -> CaptionFilter:
        """From a :class:`pyoco.config.CaptionFilterConfig` (or anything with the same attributes)."""
        return cls(
            min_words=cfg.min_words,
            max_words=cfg.max_words,
            max_chars=cfg.max_chars,
            min_letter_fraction=cfg.min_letter_fraction,
            blocklist=cfg.blocklist,
            dedupe=cfg.dedupe,
        )

    def check(self, raw: bytes | str | None) -> CaptionResult:
        text, reason, detail = decode_caption(raw)
        if reason is not None:
            return CaptionResult("", reason, detail)
        assert text is not None
        # Length first, on the raw text: a 20 MB "caption" must not go through the regexes below.
        if len(text) > 4 * self.max_chars:
            return CaptionResult("", "caption_too_long", f"{len(text)} characters > {self.max_chars}")
        text = clean_caption(text)
        if not text:
            return CaptionResult("", "caption_empty", "empty after cleaning")
        if len(text) > self.max_chars:
            return CaptionResult(text[:200], "caption_too_long", f"{len(text)} characters > {self.max_chars}")
        for rule in (
            self._html,
            self._url,
            self._boilerplate,
            self._blocked,
            self._word_count,
            self._letters,
        ):
            found = rule(text)
            if found is not None:
                return CaptionResult(text, found[0], found[1])
        return CaptionResult(text)

    # Each rule: None when it passes, else (reason, detail).
    def _html(self, text: str):
        m = _HTML_RE.search(text)
        return ("caption_html", f"markup {m.group(0)[:40]!r}") if m else None

    def _url(self, text: str):
        m = _URL_RE.search(text)
        return ("caption_url", f"url {m.group(0)[:60]!r}") if m else None

    def _boilerplate(self, text: str):
        m = _BOILERPLATE_RE.search(text)
        return ("caption_boilerplate", f"phrase {m.group(0).lower()!r}") if m else None

    def _blocked(self, text: str):
        if self._block_re is None:
            return None
        m = self._block_re.search(text)
        return ("caption_blocklist", f"blocklisted {m.group(0).lower()!r}") if m else None

    def _word_count(self, text: str):
        n = len(words(text))
        if n < self.min_words:
            return "caption_too_few_words", f"{n} words < {self.min_words}"
        if n > self.max_words:
            return "caption_too_many_words", f"{n} words > {self.max_words}"
        return None

    def _letters(self, text: str):
        chars = [c for c in text if not c.isspace()]
        letters = sum(1 for c in chars if c.isalpha())
        frac = letters / max(1, len(chars))
        if frac < self.min_letter_fraction:
            return "caption_non_letters", f"{frac:.2f} of characters are letters < {self.min_letter_fraction}"
        return None


class Deduplicator:
    """First-seen-wins duplicate detection over a stream of captions (feed them in a deterministic order)."""

    def __init__(self, mode: str = "normalized"):
        self.mode = mode
        self._seen: dict[str, str] = {}

    def check(self, text: str, ident: str) -> CaptionResult:
        key = dedupe_key(text, self.mode)
        if key is None:
            return CaptionResult(text)
        first = self._seen.setdefault(key, ident)
        if first != ident:
            return CaptionResult(text, "duplicate_caption", f"same caption as {first}")
        return CaptionResult(text)
