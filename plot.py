"""
Draws a training run's log.txt as a PNG: train loss (raw and smoothed), val loss, val bits per byte and HellaSwag
acc_norm, beside the numbers OpenAI's GPT-2 124M and GPT-3 124M reach.

    python plot.py log/log.txt            # writes log/log.png
    python plot.py log/log.txt out.png

gpt2.py redraws log_dir/log.png after each evaluation by calling plot_log, and evaluate.py --log_dir after it
appends the evaluations of a run's checkpoints.
"""

import os
import sys

# --- config ---

# references for a 124M model: OpenAI's GPT-2 checkpoint evaluated on FineWeb-Edu's val shard (as in build-nanogpt),
# and the HellaSwag acc_norm of GPT-2 124M and GPT-3 Small (124M, 300B tokens) from their papers
GPT2_VAL_LOSS = 3.2924
GPT2_HELLASWAG = 0.2955
GPT3_HELLASWAG = 0.337
SMOOTH_POINTS = 50  # the smoothed train loss averages over 1/50 of the run's steps


# --- read ---


def read_log(path):
    """{kind: (steps, values)} from lines `<step> <kind> <value>`, in step order; kinds are train, val, bpb, hella (and
    evaluate.py's task/metric). Other lines are skipped.

    `<step> rollback <to>` (gpt2.py --spike_guard=1) says that the spike at step `step` sent the run back to step `to`:
    the lines before it from step `to` on were discarded, and are left out. Its kind, rollback, holds (step, to)."""
    series = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3 or not parts[0].isdigit():
                continue  # a line being written, or a note someone added
            try:
                value = float(parts[2])
            except ValueError:
                continue
            if parts[1] == "rollback":  # what came before it from step `value` on is not the run that was kept
                for kind, (steps, values) in series.items():
                    kept = [i for i, step in enumerate(steps) if step < value or kind == "rollback"]
                    series[kind] = ([steps[i] for i in kept], [values[i] for i in kept])
            steps, values = series.setdefault(parts[1], ([], []))
            steps.append(int(parts[0]))
            values.append(value)
    # evaluate.py --log_dir appends the evaluations of older checkpoints after newer lines
    for kind, (steps, values) in series.items():
        order = sorted(range(len(steps)), key=steps.__getitem__)
        series[kind] = ([steps[i] for i in order], [values[i] for i in order])
    return series


def moving_average(values, window):
    """Trailing mean over `window` points; the first points average over what there is so far."""
    import numpy as np

    sums = np.concatenate(([0.0], np.cumsum(np.asarray(values, dtype=np.float64))))  # sums[i]: the first i values
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


# --- draw ---


def plot_log(log_file, out_file):
    """Writes out_file (PNG) from log_file. The file is replaced whole, so a viewer never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    series = read_log(log_file)
    panels = ["loss"] + [kind for kind in ("bpb", "hella") if kind in series]  # a run with --hellaswag_every=0 has no hella
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) if len(panels) > 1 else 7, 4.8), squeeze=False)
    ax_loss = axes[0, 0]
    if "train" in series:
        steps, values = series["train"]
        window = max(1, len(values) // SMOOTH_POINTS)
        ax_loss.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="train")
        if window > 1:
            ax_loss.plot(steps, moving_average(values, window), color="tab:blue", label=f"train (mean of {window} steps)")
    if "val" in series:
        steps, values = series["val"]
        ax_loss.plot(steps, values, color="tab:orange", marker="o", markersize=3, label=f"val (last {values[-1]:.4f})")
    ax_loss.axhline(GPT2_VAL_LOSS, color="tab:red", linestyle="--", linewidth=1,
                    label=f"OpenAI GPT-2 124M val ({GPT2_VAL_LOSS})")
    for i, to in enumerate(series.get("rollback", ([], []))[1]):  # where the kept run went on after a loss spike
        ax_loss.axvline(to, color="tab:purple", linestyle=":", linewidth=1,
                        label=f"rolled back to here ({len(series['rollback'][1])}x)" if i == 0 else None)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    if "bpb" in series:
        ax_bpb = axes[0, panels.index("bpb")]
        steps, values = series["bpb"]
        ax_bpb.plot(steps, values, color="tab:orange", marker="o", markersize=3, label=f"val (last {values[-1]:.4f})")
        ax_bpb.set(xlabel="step", ylabel="bits per byte", title="val bits per byte (any tokenizer)")
        ax_bpb.legend()
        ax_bpb.grid(alpha=0.3)

    if "hella" in series:
        ax_hella = axes[0, panels.index("hella")]
        steps, values = series["hella"]
        ax_hella.plot(steps, values, color="tab:green", marker="o", markersize=3, label=f"ours (last {values[-1]:.4f})")
        ax_hella.axhline(GPT2_HELLASWAG, color="tab:red", linestyle="--", linewidth=1,
                         label=f"OpenAI GPT-2 124M ({GPT2_HELLASWAG})")
        ax_hella.axhline(GPT3_HELLASWAG, color="tab:purple", linestyle="--", linewidth=1,
                         label=f"GPT-3 124M ({GPT3_HELLASWAG})")
        ax_hella.set(xlabel="step", ylabel="acc_norm", title="HellaSwag (val)")
        ax_hella.legend()
        ax_hella.grid(alpha=0.3)

    fig.suptitle(log_file)
    fig.tight_layout()
    tmp = f"{out_file}.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out_file)


def main(argv):
    if len(argv) not in (1, 2):
        print("usage: python plot.py log/log.txt [out.png]", file=sys.stderr)
        return 2
    log_file = argv[0]
    if not os.path.isfile(log_file):
        print(f"error: {log_file} does not exist: pass the log.txt that python gpt2.py writes in its log_dir", file=sys.stderr)
        return 1
    out_file = argv[1] if len(argv) == 2 else os.path.splitext(log_file)[0] + ".png"
    plot_log(log_file, out_file)
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
