import pytest

from edgekit.errors import EdgekitError
from edgekit.skip.skipset import SkipSet, last_n, parse_layer_list, parse_skip_count


def test_last_n_and_kv_slots():
    s = last_n(8, 32)
    assert s.skipped == tuple(range(24, 32))
    assert s.kept == tuple(range(24))
    assert s.kv_slot(23) == 23 and s.kv_slot(24) is None
    assert s.rule == "last:8"
    assert last_n(0, 32).skipped == () and last_n(0, 32).rule == "none"


def test_explicit_non_contiguous_renumbers_kv_slots():
    s = SkipSet.explicit(parse_layer_list("20,24-31"), 32)
    assert s.skipped == (20, *range(24, 32))
    assert s.kept[-1] == 23 and s.kv_slot(21) == 20 and s.kv_slot(23) == 22


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("1,,2", "cannot read"),
        ("a-b", "cannot read"),
        ("5-3", "backwards"),
        ("-1", "cannot read"),
        ("1.5", "cannot read"),
    ],
)
def test_malformed_lists(text, message):
    with pytest.raises(EdgekitError, match=message):
        parse_layer_list(text)


@pytest.mark.parametrize(
    ("layers", "message"),
    [([5], "out of range"), ([1, 1], "listed twice"), ([0, 1, 2, 3, 4], "all 5 layers")],
)
def test_invalid_sets(layers, message):
    with pytest.raises(EdgekitError, match=message):
        SkipSet.explicit(layers, 5)


def test_skip_count_parsing():
    assert parse_skip_count("8") == 8
    assert parse_skip_count("auto:4") == "auto:4"
    for bad in ("x", "-2", "auto:", "auto:x", "2.0"):
        with pytest.raises(EdgekitError):
            parse_skip_count(bad)
    with pytest.raises(EdgekitError, match="5 layers"):
        last_n(5, 5)
