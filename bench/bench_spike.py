"""Would --spike_guard=1 have fired on these runs? Replays the train losses of log.txt files through gpt2.py's spike
test (gpt2.spike_test, with the same settings) and prints, for each run, the steps it checked, the spikes, the largest
rise of a loss above the window's median (in MADs and in nats) and how much of the bound's margin that used (above 1
is a step above the bound: spike_patience of them in a row are a spike). Exit status 1 if any run had a spike.
    python bench/bench_spike.py --logs=log/log.txt,other/log.txt
    python bench/bench_spike.py --logs=log/log.txt --spike_k=6 --spike_min_rise=0.1

The first spike_window steps of a run are not checked (gpt2.py checks them only for NaN/inf), so a run needs more
steps than that to say anything.
"""

import math
import os
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cli import answer_help

    answer_help(__file__)

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import gpt2  # noqa: E402
from cli import UserError, run_cli  # noqa: E402
from plot import read_log  # noqa: E402


@dataclass
class Config:
    logs: str = ""  # comma-separated log.txt paths
    spike_window: int = gpt2.Config.spike_window  # as gpt2.py's settings of the same names
    spike_k: float = gpt2.Config.spike_k
    spike_min_rise: float = gpt2.Config.spike_min_rise
    spike_patience: int = gpt2.Config.spike_patience


def replay(losses, cfg):
    """(steps checked, spikes, largest rise above the median in MADs and in nats, largest share of the bound's margin
    used) over a run's losses, as SpikeGuard would test them (a spike's losses never join the window)."""
    window, above, checked, spikes, mads, nats, used = [], 0, 0, 0, -math.inf, -math.inf, -math.inf
    for loss in losses:
        verdict, _ = gpt2.spike_test(window[-cfg.spike_window:], above, loss, cfg)
        if len(window) >= cfg.spike_window and math.isfinite(loss):
            recent = np.asarray(window[-cfg.spike_window:])
            median = float(np.median(recent))
            mad = float(np.median(np.abs(recent - median)))
            checked += 1
            mads = max(mads, (loss - median) / mad if mad else 0.0)
            nats = max(nats, loss - median)
            used = max(used, (loss - median) / max(cfg.spike_k * mad, cfg.spike_min_rise))
        above = above + 1 if verdict == "above" else 0
        spikes += verdict == "spike"
        if verdict == "ok":
            window.append(loss)
    return checked, spikes, mads, nats, used


def main(cfg, _):
    paths = [p for p in cfg.logs.split(",") if p]
    if not paths:
        raise UserError("no logs: pass --logs=log/log.txt[,other/log.txt]")
    print(f"spike test: loss > median + max({cfg.spike_k:g} x MAD, {cfg.spike_min_rise:g}) of the last "
          f"{cfg.spike_window} steps, {cfg.spike_patience} steps in a row")
    print(f"{'steps':>6} {'checked':>7} {'spikes':>6} {'max rise/MAD':>12} {'max rise':>9} {'margin used':>11}  log")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist: pass the log.txt that python gpt2.py writes in its log_dir")
    fired = False
    for path in paths:
        losses = read_log(path).get("train", ([], []))[1]
        checked, spikes, mads, nats, used = replay(losses, cfg)
        fired |= spikes > 0
        print(f"{len(losses):6d} {checked:7d} {spikes:6d} {mads:12.2f} {nats:9.4f} {used:11.2f}  {path}")
    if fired:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, Config(), sys.argv[1:])
