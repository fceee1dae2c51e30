"""RepeatFilter: a line logged over and over from one place shows a few times per window, then as a count."""

import logging

from potluck.cli.log_limit import RepeatFilter, limit_repeats


class _Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _record(msg: str, *args: object, lineno: int = 10) -> logging.LogRecord:
    return logging.LogRecord("potluck.node", logging.ERROR, "/node.py", lineno, msg, args, None)


def test_a_repeated_line_passes_a_few_times_per_window_and_then_says_how_many_were_left_out() -> None:
    # Prepare
    clock = _Clock()
    limit = RepeatFilter(max_per_window=3, window_s=10.0, clock=clock)
    # Execute: 100 in one window, then one more after the window has ended
    passed = [limit.filter(_record("accept failed: %s", i)) for i in range(100)]
    clock.now_s += 10.0
    summary = _record("accept failed: %s", 100)
    summary_passed = limit.filter(summary)
    # Assert
    assert passed == [True] * 3 + [False] * 97
    assert summary_passed
    assert summary.getMessage() == "accept failed: 100 (this message was repeated 97 more times, not shown)"


def test_lines_from_other_places_are_counted_apart_and_a_quiet_window_says_nothing_extra() -> None:
    # Prepare
    clock = _Clock()
    limit = RepeatFilter(max_per_window=1, window_s=10.0, clock=clock)
    # Execute
    first = [limit.filter(_record("one", lineno=1)), limit.filter(_record("one", lineno=1))]
    other = limit.filter(_record("two", lineno=2))
    clock.now_s += 30.0
    later = _record("two", lineno=2)
    later_passed = limit.filter(later)
    # Assert
    assert first == [True, False] and other
    assert later_passed and later.getMessage() == "two"


def test_messages_built_with_f_strings_are_limited_by_where_they_are_logged() -> None:
    # Prepare
    limit = RepeatFilter(max_per_window=2, window_s=10.0, clock=_Clock())
    # Execute
    passed = [limit.filter(_record(f"peer {i} failed")) for i in range(5)]
    # Assert
    assert passed == [True, True, False, False, False]


def test_a_library_logger_s_own_handler_gets_one_filter_however_often_it_is_asked() -> None:
    # Prepare: a library logging through a handler of its own, as hivemind does
    library = logging.getLogger("tests.unit.own_handler_library")
    handler = logging.NullHandler()
    library.addHandler(handler)
    try:
        # Execute
        limit_repeats(library)
        limit_repeats(library)
    finally:
        library.removeHandler(handler)
    # Assert
    assert [type(f) for f in handler.filters] == [RepeatFilter]
