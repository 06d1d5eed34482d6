"""The pure core of pipeline/rewrites.py: what a consumer remembers and where it reads again."""

from __future__ import annotations

from pipeline.rewrites import FROM_START, HandledLog, LogNow, Seen, fingerprint, resume_offset

KEY = ("photos", 0)


def records(offsets: range, tag: str) -> list[Seen]:
    return [fingerprint(o, 1_700_000_000_000 + o, f"k{o}".encode(), f"{tag}{o}".encode()) for o in offsets]


def log(seen: list[Seen], high: int) -> LogNow:
    return LogNow(high, {s.offset: s for s in seen})


def test_fingerprints_tell_records_at_one_offset_apart() -> None:
    base = fingerprint(5, 1, b"k", b"v")
    assert base == fingerprint(5, 1, b"k", b"v")
    assert base != fingerprint(5, 2, b"k", b"v")
    assert base != fingerprint(5, 1, b"k2", b"v")
    assert base != fingerprint(5, 1, b"k", b"w")
    assert fingerprint(5, 1, None, b"v") != fingerprint(5, 1, b"", b"v")
    assert fingerprint(5, 1, b"ab", b"c") != fingerprint(5, 1, b"a", b"bc")


def test_the_window_keeps_the_newest_records_and_forgets_what_is_read_again() -> None:
    handled = HandledLog(depth=4)
    for seen in records(range(10), "a"):
        handled.remember(KEY, seen)
    assert [s.offset for s in handled.window(KEY)] == [6, 7, 8, 9]
    handled.remember(KEY, records(range(7, 8), "b")[0])  # rewound to 7: 7..9 are history
    assert [s.offset for s in handled.window(KEY)] == [6, 7]
    assert handled.window(("photos", 1)) == []
    assert list(handled.partitions()) == [KEY]


def test_an_intact_log_needs_no_rewind() -> None:
    window = records(range(10, 20), "a")
    assert resume_offset(window, log(records(range(10, 25), "a"), high=25)) is None


def test_a_log_cut_short_and_refilled_is_read_again_after_the_last_kept_record() -> None:
    window = records(range(10, 20), "a")
    # The broker kept 10..16, lost 17..19, and put new records at 17.. (its end passed ours again).
    now = log(records(range(10, 17), "a") + records(range(17, 30), "new"), high=30)
    assert resume_offset(window, now) == 17


def test_a_log_that_ends_before_our_records_is_read_again_from_its_end() -> None:
    window = records(range(10, 20), "a")
    assert resume_offset(window, log(records(range(10, 15), "a"), high=15)) == 15


def test_a_log_that_kept_none_of_our_records_is_read_from_its_start() -> None:
    window = records(range(10, 20), "a")
    assert resume_offset(window, log(records(range(0, 5), "new"), high=5)) == FROM_START
    assert resume_offset(window, log(records(range(0, 40), "new"), high=40)) == FROM_START


def test_compaction_gaps_are_not_rewrites() -> None:
    window = records(range(10, 20), "a")
    compacted = [s for s in records(range(10, 20), "a") if s.offset % 3]  # 12, 15, 18 compacted away
    assert resume_offset(window, log(compacted, high=20)) is None
    # A gap, then a changed record: read again right after the last record still there.
    changed = [s for s in compacted if s.offset < 16] + records(range(16, 20), "new")
    assert resume_offset(window, log(changed, high=20)) == 15
