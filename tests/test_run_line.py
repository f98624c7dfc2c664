"""What a user sees first: mistakes reported before any work, and a step line that says where the run is."""

import re

import pytest
from conftest import TINY, run_gpt2

import gpt2
from cli import merge_settings, run_cli

STEP = re.compile(r"^step +(\d+)/(\d+) \((\d+\.\d)%\) \| loss [\d.]+ \| .* \| elapsed (\d+:\d\d:\d\d) \| eta (\?|\d+:\d\d:\d\d)$")


def test_the_step_line_gives_the_step_of_the_total_the_share_done_elapsed_and_eta(shards, tmp_path):
    args = [*TINY, f"--data_dir={shards}", f"--log_dir={tmp_path}", "--max_steps=8", "--val_every=3",
            "--val_tokens=128", "--checkpoint_every=4"]
    first = run_gpt2(*args, "--max_steps=4", in_process=True).stdout  # then resumed to 8: the count goes on from the checkpoint
    second = run_gpt2(*args, "--init_from=resume", in_process=True).stdout
    for out, steps in ((first, range(4)), (second, range(4, 8))):
        lines = [line for line in out.splitlines() if STEP.match(line)]
        assert [int(STEP.match(line)[1]) for line in lines] == list(steps), out
        for line in lines:
            step, total, percent, _, eta = STEP.match(line).groups()
            assert int(total) == int(steps.stop) and float(percent) == round(100 * (int(step) + 1) / int(total), 1)
        # the first step of each process is compilation and warm-up: no rate yet, so no ETA; then one
        assert STEP.match(lines[0])[5] == "?" and all(STEP.match(line)[5] != "?" for line in lines[1:])
        assert STEP.match(lines[-1])[5] == "0:00:00"  # nothing left
    assert "\r" not in first + second


@pytest.mark.parametrize("argv, error", [
    (["--data_dir=nowhere"], "error: data_dir nowhere/ does not exist: run python fineweb.py"),
    (["--init_from=nowhere/model_00100.pt"], "error: --init_from=nowhere/model_00100.pt: no such checkpoint"),
    (["--max_step=5"], "error: unknown setting 'max_step': did you mean max_steps"),
    (["--max_steps=-5"], "error: --max_steps=-5"),
])
def test_mistakes_are_reported_before_any_estimate_model_or_download(shards, tmp_path, capsys, argv, error):
    # the default micro batch is auto, whose estimate and line would come first if the checks did not
    with pytest.raises(SystemExit) as stopped:
        run_cli(gpt2.main, gpt2.Config(), merge_settings([f"--data_dir={shards}", f"--log_dir={tmp_path / 'log'}",
                                                          "--device=cpu", *argv]))
    out, err = capsys.readouterr()
    assert stopped.value.code == 1 and out == "", out
    assert err.startswith(error) and err.count("\n") == 1, err
    assert not (tmp_path / "log").exists()  # nothing written
