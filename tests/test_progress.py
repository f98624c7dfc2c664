"""cli.Progress: the count, the percent, elapsed and ETA of a long loop, on a clock the test sets by hand. Each
expected value is worked out in the test from the times it feeds in."""

from cli import Progress, hms


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def steps(progress, clock, seconds_each, start):
    """One unit per update, each taking the given seconds on the clock; returns the units done."""
    done = start
    for seconds in seconds_each:
        clock.now += seconds
        done += 1
        progress.update(done)
    return done


def test_count_and_percent():
    clock = FakeClock()
    assert Progress(19073, done=1200, clock=clock).count() == " 1200/19073 (6.3%)"  # 6.29%, padded to 5 digits
    assert Progress(10, clock=clock).count() == " 0/10 (0.0%)"
    assert Progress(10000, done=9999, clock=clock).count() == " 9999/10000 (99.9%)"  # 99.99% is not done
    assert Progress(10000, done=10000, clock=clock).count() == "10000/10000 (100.0%)"
    assert Progress(None, done=5, clock=clock).count() == "5"


def test_durations():
    assert hms(0) == "0:00:00"
    assert hms(59.6) == "0:01:00"
    assert hms(3723) == "1:02:03"
    assert hms(23 * 3600 + 59 * 60 + 59) == "23:59:59"
    assert hms(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03:04:05"


def test_eta_is_unknown_until_a_counted_unit_and_skips_the_first():
    clock = FakeClock()
    progress = Progress(10, skip=1, clock=clock)
    assert progress.times() == "elapsed 0:00:00 | eta ?"
    steps(progress, clock, [30.0], start=0)  # compilation: not a rate
    assert progress.times() == "elapsed 0:00:30 | eta ?"
    steps(progress, clock, [2.0, 2.0, 2.0], start=1)
    # 4 done, 6 left at 2 s each; elapsed 30 + 3 * 2 = 36 s
    assert progress.times() == "elapsed 0:00:36 | eta 0:00:12"


def test_a_slow_outlier_does_not_move_the_eta():
    clock = FakeClock()
    progress = Progress(100, skip=0, clock=clock)
    steps(progress, clock, [1.0, 1.0, 100.0, 1.0, 1.0], start=0)
    assert progress.eta() == 95 * 1.0  # the mean, 20.8 s, would say 33 minutes


def test_only_the_latest_window_counts():
    clock = FakeClock()
    progress = Progress(100, skip=0, window=3, clock=clock)
    steps(progress, clock, [10.0, 10.0, 10.0, 10.0, 3.0, 3.0, 3.0], start=0)
    assert progress.eta() == 93 * 3.0


def test_explicit_seconds_and_several_units_per_update():
    clock = FakeClock()
    progress = Progress(1000, skip=0, clock=clock)
    clock.now += 500.0  # an evaluation between steps, which the caller leaves out of `seconds`
    progress.update(10, seconds=20.0)  # 10 units in 20 s
    assert progress.eta() == 990 * 2.0
    assert progress.times() == f"elapsed 0:08:20 | eta {hms(990 * 2.0)}"  # elapsed is the wall clock, 500 s


def test_an_update_without_new_units_carries_its_time():
    clock = FakeClock()
    progress = Progress(100, skip=0, clock=clock)
    clock.now += 4.0
    progress.update(0)
    clock.now += 2.0
    progress.update(2)  # 2 units in 4 + 2 s
    assert progress.eta() == 98 * 3.0


def test_units_done_already_do_not_count_for_the_rate():
    clock = FakeClock()
    progress = Progress(10, skip=0, clock=clock)
    clock.now += 0.01
    progress.update(4, timed=False)  # found done: 4 units in no time would make the rate 400 per second
    assert progress.count() == " 4/10 (40.0%)" and progress.eta() is None
    steps(progress, clock, [5.0], start=4)
    assert progress.eta() == 5 * 5.0


def test_resumed_run_counts_from_where_it_is():
    clock = FakeClock()
    progress = Progress(100, done=40, skip=1, clock=clock)
    steps(progress, clock, [60.0, 5.0, 5.0], start=40)  # the first after the start compiles again
    assert progress.count() == " 43/100 (43.0%)"
    assert progress.times() == "elapsed 0:01:10 | eta 0:04:45"  # 57 left at 5 s


def test_total_reached():
    clock = FakeClock()
    progress = Progress(3, skip=1, clock=clock)
    steps(progress, clock, [10.0, 1.0, 1.0], start=0)
    assert progress.count() == "3/3 (100.0%)"
    assert progress.times() == "elapsed 0:00:12 | eta 0:00:00"
    skipped_all = Progress(1, skip=1, clock=clock)  # done before any rate was known: nothing is left either way
    steps(skipped_all, clock, [5.0], start=0)
    assert skipped_all.times().endswith("| eta 0:00:00")


def test_the_report_is_one_line():
    clock = FakeClock()
    progress = Progress(19073, done=1200, clock=clock)
    steps(progress, clock, [100.0] + [0.4] * 30 + [3 * 86400.0], start=1200)  # compiled, 30 steps, a 3-day stall
    line = f"step {progress.count()} | loss 3.123456 | {progress.times()}"
    assert "\n" not in line and "\r" not in line
    # 1232 done (6.46%); elapsed 100 + 12 s + 3 days; 17841 left at 0.4 s = 7136 s
    assert line == "step  1232/19073 (6.5%) | loss 3.123456 | elapsed 3d 00:01:52 | eta 1:58:56"
