"""notebooks/free_gpu.ipynb, executed whole in a real Jupyter kernel on the CPU: tiny settings, local data with
FineWeb-Edu's columns. Run again after its data are gone (a new session) with more steps, it resumes."""

import ast
import dataclasses
import json
import os
import shutil

import nbformat
import torch
from conftest import ROOT, read_log
from nbclient import NotebookClient

import gpt2

NOTEBOOK = os.path.join(ROOT, "notebooks", "free_gpu.ipynb")


def parameters_cell(nb):
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def defaults(nb):
    """The parameters cell's settings, {name: value}, read without running it."""
    tree = ast.parse(nb.cells[parameters_cell(nb)].source)
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


def fineweb_edu_parquet(path):
    """Documents under FineWeb-Edu's own column names: the sections of Python's language reference, which ships with
    every Python (real English, enough of it for a loss to fall)."""
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [topics[key] for key in sorted(topics)]
    n = len(texts)
    pq.write_table(pa.table({
        "text": texts, "id": [f"<urn:uuid:{i:08d}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://docs.python.org/3/reference/{i}" for i in range(n)], "file_path": ["s3://x.warc.gz"] * n,
        "language": ["en"] * n, "language_score": [0.95] * n, "token_count": [len(t) // 4 for t in texts],
        "score": [3.1] * n, "int_score": [3] * n,
    }), path, row_group_size=64)


def execute(settings):
    """Runs the notebook as papermill does: a cell of overrides after the parameters cell, each naming a setting the
    parameters cell has. Started where Jupyter starts it, notebooks/; returns the executed notebook."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    unknown = set(settings) - set(defaults(nb))
    assert not unknown, f"not settings of the notebook: {sorted(unknown)}"
    overrides = "\n".join(f"{name} = {value!r}" for name, value in settings.items())
    nb.cells.insert(parameters_cell(nb) + 1, nbformat.v4.new_code_cell(overrides, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    return nb


def text_of(nb, needle):
    """The printed output of the one code cell whose source contains needle."""
    [cell] = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_notebook_trains_plots_evaluates_samples_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel and the scripts inherit it; pytest -n 2 runs two tests
    fineweb_edu_parquet(tmp_path / "fineweb-edu.parquet")
    log_dir, data_dir = tmp_path / "drive" / "run", tmp_path / "session_disk" / "data"
    settings = dict(INSTALL=False, DATA_FILES=str(tmp_path / "fineweb-edu.parquet"), MAX_DOCS=0, VAL_TOKENS=4096,
                    DATA_DIR=str(data_dir), CHECKPOINT_DIR=str(log_dir), N_LAYER=2, N_HEAD=2, N_EMBD=32, BLOCK_SIZE=32,
                    TOTAL_BATCH_SIZE=256, MAX_STEPS=24, WARMUP_STEPS=2, MAX_LR=1e-2, VAL_EVERY=12, SAMPLE_EVERY=0,
                    CHECKPOINT_EVERY=12, DEVICE="cpu", COMPILE=False, HELLASWAG=False, PROMPT="The import statement",
                    NUM_SAMPLES=3, MAX_NEW_TOKENS=16)
    nb = execute(settings)

    log = read_log(log_dir)
    train = [log[(step, "train")] for step in range(24)]
    assert sum(train[-5:]) / 5 < train[0] - 1.0, train  # it learned: from ~ln(50304) = 10.8 down
    assert log[(24, "val")] < log[(0, "val")] - 1.0  # validated after the last step
    assert sorted(os.listdir(log_dir)) == ["log.png", "log.txt", "model_00012.pt", "model_00024.pt", "samples.jsonl"]
    with open(log_dir / "log.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    plot_cell = next(c for c in nb.cells if c.cell_type == "code" and '"plot.py"' in c.source)
    assert any("image/png" in out.get("data", {}) for out in plot_cell.outputs)  # shown in the notebook too
    samples = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    assert all(s["prompt"] == "The import statement" and len(s["tokens"]) == 16 and s["completion"].strip() for s in samples)
    assert "init_from=resume: no checkpoint" in text_of(nb, '"gpt2.py", *train')

    # a new session: the data on its disk are gone, the checkpoints on "Drive" are not; Run all, with more steps
    shutil.rmtree(data_dir)
    nb = execute(settings | dict(MAX_STEPS=30, KEEP_CHECKPOINTS=1))
    assert "resuming from" in text_of(nb, '"gpt2.py", *train') and "model_00024.pt" in text_of(nb, '"gpt2.py", *train')
    with open(log_dir / "log.txt") as f:
        train_steps = [int(line.split()[0]) for line in f if line.split()[1] == "train"]
    assert train_steps == list(range(30))  # 24..29 appended once, nothing trained twice
    assert [name for name in os.listdir(log_dir) if name.endswith(".pt")] == ["model_00030.pt"]


def test_t4_defaults_are_settings_gpt2_accepts_and_fit_a_t4():
    # the notebook's own values, checked by gpt2.py's rules and its memory estimate for a T4's 15 GB, in float16
    p = defaults(nbformat.read(NOTEBOOK, as_version=4))
    cfg = dataclasses.replace(gpt2.Config(), n_layer=p["N_LAYER"], n_head=p["N_HEAD"], n_embd=p["N_EMBD"],
                              block_size=p["BLOCK_SIZE"], total_batch_size=p["TOTAL_BATCH_SIZE"],
                              micro_batch_size=p["MICRO_BATCH_SIZE"], max_steps=p["MAX_STEPS"],
                              warmup_steps=p["WARMUP_STEPS"], max_lr=p["MAX_LR"], min_lr=p["MAX_LR"] / 10,
                              val_every=p["VAL_EVERY"], val_tokens=p["VAL_TOKENS"], sample_every=p["SAMPLE_EVERY"],
                              checkpoint_every=p["CHECKPOINT_EVERY"], keep_checkpoints=p["KEEP_CHECKPOINTS"],
                              hellaswag_every=0, max_new_tokens=p["MAX_NEW_TOKENS"])
    gpt2.check_config(cfg)
    chosen, line = gpt2.choose_micro_batch(cfg, p["GPUS"], torch.float16, "plain", free=15.0e9)
    assert chosen.micro_batch_size == 32 and not chosen.activation_checkpointing, line  # the notebook says 32
    # what its markdown's arithmetic says: 194 MFLOP per token, 0.21B tokens
    model = gpt2.GPT(gpt2.model_config(cfg))
    assert round(model.flops_per_token(cfg.block_size) / 1e6) == 194
    assert round(p["MAX_STEPS"] * p["TOTAL_BATCH_SIZE"] / 1e9, 2) == 0.21


