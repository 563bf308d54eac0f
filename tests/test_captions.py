"""pyoco.captions: every rule fires with its stable reason code, cleaning, duplicates, class names."""

from __future__ import annotations

import pytest

from pyoco.captions import (
    REASONS,
    CaptionFilter,
    Deduplicator,
    class_name_caption,
    clean_caption,
    dedupe_key,
    normalize,
)


@pytest.fixture()
def rules():
    return CaptionFilter(min_words=2, max_words=12, max_chars=200, blocklist=["gore", "bad phrase"])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "caption_missing"),
        (b"a red \xff circle", "caption_invalid_utf8"),
        ("  \n\t ", "caption_empty"),
        ("x" * 201, "caption_too_long"),
        ("word " * 20_000, "caption_too_long"),
        ("<p>a red circle</p>", "caption_html"),
        ("a red circle <br/> moving", "caption_html"),
        ("see https://example.com/v now", "caption_url"),
        ("a red circle www.example.org", "caption_url"),
        ("Click here to watch a red circle", "caption_boilerplate"),
        ("stock footage of a red circle", "caption_boilerplate"),
        ("a red circle with gore", "caption_blocklist"),
        ("this is a Bad Phrase indeed", "caption_blocklist"),
        ("circle", "caption_too_few_words"),
        ("one two three four five six seven eight nine ten eleven twelve thirteen", "caption_too_many_words"),
        ("12 34 !! ## 56 ?? ab", "caption_non_letters"),
    ],
)
def test_each_rule_has_its_reason(rules, raw, reason):
    result = rules.check(raw)
    assert result.reason == reason, result
    assert reason in REASONS
    assert not result.ok and result.detail


def test_accepts_and_cleans(rules):
    result = rules.check('\ufeff  "A red  circle\u200b moves &amp; turns"  '.encode())
    assert result.ok and result.reason is None
    assert result.text == "A red circle moves & turns"
    assert clean_caption("a\tb\n\nc") == "a b c"


def test_blocklist_is_whole_word(rules):
    assert rules.check("a gorey red circle moves").ok  # "gore" is not a word of it


def test_duplicates_exact_and_normalized():
    a, b = "A red circle moves left.", "a RED circle   moves left"
    assert normalize(a) == normalize(b) == "a red circle moves left"
    assert dedupe_key(a, "normalized") == dedupe_key(b, "normalized")
    assert dedupe_key(a, "exact") != dedupe_key(b, "exact")
    assert dedupe_key(a, "none") is None
    with pytest.raises(ValueError, match="dedupe mode"):
        dedupe_key(a, "fuzzy")
    d = Deduplicator("normalized")
    assert d.check(a, "s#1").ok
    dup = d.check(b, "s#2")
    assert dup.reason == "duplicate_caption" and "s#1" in dup.detail
    assert d.check(a, "s#1").ok  # the first one stays accepted when seen again
    assert Deduplicator("exact").check(b, "x").ok


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        ("ApplyEyeMakeup", "apply eye makeup"),
        ("YoYo", "yo yo"),
        ("PlayingDaf", "playing daf"),
        ("HandstandPushups", "handstand pushups"),
        ("Skijet", "skijet"),
        ("JumpingJack", "jumping jack"),
        ("TaiChi", "tai chi"),
        ("playing_guitar", "playing guitar"),
    ],
)
def test_ucf101_class_names(name, caption):
    assert class_name_caption(name) == caption


def test_from_config():
    from pyoco.config import CaptionFilterConfig

    f = CaptionFilter.from_config(CaptionFilterConfig(min_words=3, blocklist=["zzz"]))
    assert f.check("two words").reason == "caption_too_few_words"
    assert f.check("three words zzz").reason == "caption_blocklist"
