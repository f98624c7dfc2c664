"""plot.py: log.txt to a PNG, from the command line and from gpt2.py's training loop."""

import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import gpt2
import plot

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(path, steps=300):
    """A log as gpt2.py writes it: a falling train loss every step, val every 50, HellaSwag every 100."""
    lines = []
    for step in range(steps):
        if step % 50 == 0:
            lines.append(f"{step} val {4 + 6 * math.exp(-step / 60):.4f}")
        if step % 100 == 0:
            lines.append(f"{step} hella {0.25 + step / 10000:.4f}")
        lines.append(f"{step} train {4 + 6 * math.exp(-step / 60) + 0.3 * math.sin(step):.6f}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n2")  # a last line cut short by a writer that was killed


def assert_png(path, min_width=600, min_height=300):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_width and img.height >= min_height


def test_read_log_parses_each_kind(tmp_path):
    write_log(tmp_path / "log.txt")
    series = plot.read_log(tmp_path / "log.txt")
    assert len(series["train"][0]) == 300 and series["val"][0] == [0, 50, 100, 150, 200, 250]
    assert series["hella"][1] == [0.25, 0.26, 0.27]


def test_plot_writes_a_png(tmp_path):
    write_log(tmp_path / "log.txt")
    plot.plot_log(str(tmp_path / "log.txt"), str(tmp_path / "out.png"))
    assert_png(tmp_path / "out.png")
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "out.png"]  # no temporary file left behind


def test_command_line_writes_beside_the_log(tmp_path):
    write_log(tmp_path / "log.txt", steps=3)  # too short to smooth, no HellaSwag beyond step 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(tmp_path / "log.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "log.png")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(tmp_path / "missing.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_a_plot_failure_warns_once_and_does_not_raise(tmp_path, capsys):
    write_log(tmp_path / "log.txt")
    refresh = gpt2.make_plotter(str(tmp_path / "log.txt"), str(tmp_path / "no_such_dir" / "log.png"))
    refresh()
    refresh()
    out = capsys.readouterr().out
    assert out.count("warning: cannot draw") == 1
