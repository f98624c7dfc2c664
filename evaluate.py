"""
Evaluation as the field does it: a model on the benchmarks GPT-2 is compared on, scored by EleutherAI's
lm-evaluation-harness (pip install lm_eval), and the saved checkpoints of a run evaluated after the fact.

    python evaluate.py --checkpoint=log/model_19073.pt       # lambada_openai, piqa, arc_easy, winogrande, hellaswag
    python evaluate.py -m gpt2 --tasks=lambada_openai,hellaswag --limit=500
    python evaluate.py --checkpoint=log/model_19073.pt --tasks=my_task --include_path=my_tasks/   # your own task YAML
    torchrun --standalone --nproc_per_node=8 evaluate.py -m gpt2-xl --output=gpt2-xl.json
    python evaluate.py --log_dir=log                         # every checkpoint of a run: val loss, bpb, HellaSwag

A model goes to the harness as a subclass of its LM (GPTLM below): the harness renders each task's prompts and
computes its metrics, GPTLM scores log-likelihoods with our GPT and generates greedily with our KV cache. It scores
what the harness's own `hf` model scores on our export (gpt2.py --mode=export): the same tokens, the same truncation
to the context length, the same 50257-token vocabulary. Under torchrun each rank takes its share of every task (the
harness's own rank and world size), and rank 0 prints the harness's table and writes --output.

--log_dir=DIR evaluates every checkpoint of a training run and appends the results to DIR/log.txt under each
checkpoint's step, so that plot.py draws a run that trained with evaluation off: validation loss and bits per byte
on the run's own data_dir and val_tokens, HellaSwag with gpt2.py's scorer, and harness tasks when --tasks is given
(lines `<step> <task>/<metric> <value>`). DIR/evaluated.jsonl notes what was evaluated with which settings: a
checkpoint evaluated already with the same settings is skipped. log.txt never holds two values of one metric at one step:
evaluated again with other settings (another --data_dir, --val_tokens, --hellaswag_file or --limit), the new values
replace those logged at that step before (by training or by evaluate.py) and a line says which; log.txt is then
rewritten whole, to a temporary file renamed over it, with each new value in the old one's place.

This file imports gpt2 and cli, never another command.
"""

if __name__ == "__main__":  # --help is read from this file's text, before the imports below load torch
    from cli import answer_help

    answer_help(__file__)

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import ANY, Progress, Relation, UserError, at_least, check_settings, expand_aliases, one_of, run_cli
from gpt2 import (
    GPT,
    GPT2_VOCAB,
    ValLoader,
    check_model_path,
    check_torch_version,
    evaluate_hellaswag,
    evaluate_loss,
    generate,
    get_tokenizer,
    list_checkpoints,
    load_checkpoint,
    load_hellaswag,
    load_hf_model,
    load_model,
    log_softmax_chunks,
    make_autocast,
    make_plotter,
    model_config,
    setup_distributed,
    teardown_distributed,
)
from gpt2 import Config as RunConfig  # a training run's settings, as its checkpoints hold them

try:  # optional: --log_dir without --tasks runs without the harness
    from lm_eval.api.model import TemplateLM
except ImportError:
    TemplateLM = None

# --- config ---

DEFAULT_TASKS = "lambada_openai,piqa,arc_easy,winogrande,hellaswag"  # zero-shot, as GPT-2 is usually compared


@dataclass
class Config:
    model: str = ""  # a Hugging Face GPT-2 (gpt2, gpt2-xl, or a saved directory); also -m NAME
    checkpoint: str = ""  # or one of our checkpoints, log/model_XXXXX.pt
    log_dir: str = ""  # or every checkpoint of a run, results appended to its log.txt (exactly one of the three)
    tasks: str = DEFAULT_TASKS  # harness task names, comma-separated; with --log_dir only those given (default none)
    include_path: str = ""  # a directory of your own task YAML, as the harness's --include_path
    limit: int = 0  # the first N examples of each task; 0 = all
    batch_size: int = 16  # sequences per forward pass
    bootstrap_iters: int = 100000  # the harness's resamples for the stderr of metrics without a formula; 0 = none
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (CUDA: bfloat16, or float16 on GPUs without it; else float32) | float32 | bfloat16 | float16
    output: str = ""  # write the harness's results and configs (no per-sample data) to this JSON file
    # --log_dir only
    data_dir: str = ""  # the val shards; "" = the run's own data_dir
    val_tokens: int = 0  # validation over the first N tokens of the val split; 0 = the run's own val_tokens
    hellaswag: bool = True  # HellaSwag acc_norm (gpt2.py's scorer, as training logs it)
    hellaswag_file: str = ""  # a local hellaswag_val.jsonl; "" = the run's own hellaswag_file, else downloaded once
    debug: bool = False  # show tracebacks instead of one-line errors


RULES = {  # what each setting accepts, checked before any work (see cli.check_settings)
    "model": ANY,  # checked when it is loaded, before any data is downloaded
    "checkpoint": ANY,
    "log_dir": ANY,
    "tasks": ANY,  # checked against the harness's task list
    "include_path": ANY,
    "limit": at_least(0),
    "batch_size": at_least(1),
    "bootstrap_iters": at_least(0),
    "device": one_of("auto", "cpu", "cuda", "mps"),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "output": ANY,
    "data_dir": ANY,
    "val_tokens": at_least(0),
    "hellaswag": ANY,
    "hellaswag_file": ANY,
    "debug": ANY,
}
RELATIONS = [
    Relation(("model", "checkpoint", "log_dir"), lambda c: bool(c.model) + bool(c.checkpoint) + bool(c.log_dir) == 1,
             lambda c: "pass exactly one of -m NAME (a Hugging Face model such as gpt2, or its directory), "
                       "--checkpoint=PATH (a model_XXXXX.pt written by gpt2.py) and --log_dir=DIR (every checkpoint of a run)",
             {"model": "gpt2", "checkpoint": "x.pt"}),
    Relation(("output", "log_dir"), lambda c: not (c.output and c.log_dir),
             lambda c: "--output writes the results of one model: with --log_dir they go to the run's log.txt, so drop "
                       "--output", {"output": "x.json", "log_dir": "log", "checkpoint": "", "model": ""}),
]


# --- the harness's view of our model ---


class GPTLM(TemplateLM or object):
    """Our GPT as an lm-evaluation-harness model.

    The harness's TemplateLM turns each (context, continuation) into tokens as it does for its `hf` model (the
    continuation is what the whole text has beyond the context's tokens; an empty context is <|endoftext|>); we score
    the tokens: each sequence keeps its last block_size + 1 tokens, the continuation's log-probabilities are summed, and
    it is greedy when every token is the argmax. The softmax is over GPT-2's 50257 tokens, not our padded vocabulary,
    as in an export. Rolling log-likelihoods (perplexity tasks) cut a text into the harness's windows and score them
    the same way. Generation is greedy, by gpt2.generate (one token per forward pass through our KVCache), until a
    stop sequence.
    """

    def __init__(self, model, device, autocast, batch_size=16, rank=0, world_size=1, name="gpt"):
        super().__init__()
        self.model = model.eval()
        self.enc = get_tokenizer()
        self.autocast, self.batch_size, self.name = autocast, batch_size, name
        self._device, self._rank, self._world_size = device, rank, world_size
        self.max_length = model.config.block_size
        self.max_gen_toks = 256  # the harness's default when a task sets none

    # tokens

    @property
    def eot_token_id(self):
        return self.enc.eot_token

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        # as transformers' GPT-2 tokenizer: <|endoftext|> written in the text is that token
        return self.enc.encode(string, allowed_special={"<|endoftext|>"})

    def tok_decode(self, tokens, **kwargs):
        return self.enc.decode(tokens)

    @property
    def tokenizer_name(self):
        return "gpt2"

    def get_model_info(self):
        return {"model": self.name}  # what the harness's result dict names the model

    # scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(sum of the continuation's log-probabilities, whether it is greedy)] for requests [(the strings or None,
        context tokens, continuation tokens)]."""
        model, out = self.model, [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))  # little padding
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm or self.rank != 0, desc="scoring"):
            chosen = order[start:start + self.batch_size]
            rows = []  # (inputs, continuation): each keeps its last block_size + 1 tokens, the last one only predicted
            for i in chosen:
                _, context, continuation = requests[i]
                inputs = (context + continuation)[-(self.max_length + 1):][:-1]
                rows.append((inputs, continuation[max(len(continuation) - len(inputs), 0):]))
            T = max(len(inputs) for inputs, _ in rows)
            idx = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T), padded on the right: causal, so it changes nothing
            sources, targets, owners = [], [], []  # per continuation token: the output predicting it, it, its row
            for b, (inputs, continuation) in enumerate(rows):
                idx[b, :len(inputs)] = torch.tensor(inputs)
                sources += range(b * T + len(inputs) - len(continuation), b * T + len(inputs))
                targets += continuation
                owners += [b] * len(continuation)
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)
            sources, targets, owners = as_tensor(sources), as_tensor(targets), as_tensor(owners)
            logprobs = torch.zeros(len(targets), dtype=torch.double, device=self.device)  # (M,), M continuation tokens
            missed = torch.zeros(len(targets), dtype=torch.long, device=self.device)  # 1 where it is not the argmax
            with self.autocast():
                h = model.hidden_states(idx.to(self.device)).flatten(0, 1)[sources]  # (M, C)
                for r, logp, _ in log_softmax_chunks(h, model.lm_head.weight, vocab=GPT2_VOCAB):  # logp (m, vocab_size)
                    logprobs[r] = logp.gather(1, targets[r, None])[:, 0].double()
                    missed[r] = (logp.argmax(1) != targets[r]).long()
            sums = torch.zeros(len(rows), dtype=torch.double, device=self.device).index_add_(0, owners, logprobs)
            misses = torch.zeros(len(rows), dtype=torch.long, device=self.device).index_add_(0, owners, missed)
            for b, i in enumerate(chosen):
                out[i] = (sums[b].item(), misses[b].item() == 0)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # generation

    def generate_until(self, requests, disable_tqdm=False):
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="generating"):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise UserError(f"a task asks for sampling ({gen_kwargs}): evaluate.py decodes greedily only")
            until = handle_stop_sequences(kwargs.get("until"), eos=self.tok_decode([self.eot_token_id]))
            max_new = min(kwargs["max_gen_toks"], self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]  # as the hf model: the context's end
            text = postprocess_generated_text(self.tok_decode(self.greedy(prompt, max_new, until)), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def greedy(self, prompt, max_new_tokens, until):
        """The argmax continuation of the token list prompt, until a stop sequence appears or max_new_tokens."""
        stop = lambda new: any(text in self.tok_decode(new) for text in until)
        tokens, _ = generate(self.model, prompt, 1, max_new_tokens, top_k=1, vocab_limit=GPT2_VOCAB,
                             autocast=self.autocast, stop=stop)
        return tokens[0].tolist()

    # the ranks: the harness gives each its share of the requests and gathers the metrics

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


# --- the harness ---


def require_harness():
    if TemplateLM is None:
        raise UserError("evaluate.py scores tasks with EleutherAI's lm-evaluation-harness, which is not installed: "
                        "pip install lm_eval (with --log_dir, --tasks= evaluates without it)")


def task_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def task_manager(tasks, include_path):
    """The harness's TaskManager for `tasks`, each checked to exist. Tasks that --include_path defines are read from
    there alone when it defines them all, which spares indexing the harness's thousands of task files."""
    from lm_eval.tasks import TaskManager

    if include_path:  # main checked that it exists
        own = TaskManager(include_path=include_path, include_defaults=False)
        if set(own.match_tasks(tasks)) == set(tasks):
            return own
    manager = TaskManager(include_path=include_path or None)
    check_tasks(tasks, manager)
    return manager


def check_tasks(tasks, manager):
    """A UserError naming the first of tasks that the harness's task list (manager's) does not hold."""
    known = set(manager.match_tasks(tasks))
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown task {unknown[0]!r}{hint}: `lm-eval ls tasks` lists the harness's tasks; "
                        f"a task of your own needs --include_path=DIR")


def run_harness(lm, tasks, manager, cfg):
    """The harness's result dict on rank 0 (None on the others), per-sample data left out."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=cfg.limit or None,
                           batch_size=cfg.batch_size, bootstrap_iters=cfg.bootstrap_iters, log_samples=False)


def print_tables(results):
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))


def write_json(path, results):
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot", "n-samples", "config")
            if k in results}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(keep, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    os.replace(tmp, path)


def check_vocab(model, name, fix="train with the default --vocab_size=50304"):
    """The tasks are text, which only GPT-2's tokenizer turns into this model's tokens."""
    v = model.config.vocab_size
    if v < GPT2_VOCAB:
        raise UserError(f"{name} has vocab_size={v}, not GPT-2's {GPT2_VOCAB} tokens: its tokens are not GPT-2's, so it "
                        f"cannot read the tasks' text; {fix}")


def check_hf_vocab(name):
    """A Hugging Face model's vocabulary, from its config alone (before any weights are downloaded)."""
    from transformers import AutoConfig

    try:
        v = AutoConfig.from_pretrained(name).vocab_size
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load Hugging Face model {name!r} ({str(e).strip().splitlines()[0]}): pass a hub name "
                        f"such as gpt2 (needs the network or the HF cache) or a directory saved by transformers") from None
    if v != GPT2_VOCAB:
        raise UserError(f"Hugging Face model {name!r} has vocab_size={v}, not GPT-2's {GPT2_VOCAB}: evaluate.py reads "
                        f"text with GPT-2's tokenizer, so only GPT-2 vocabularies are scored right")


# --- one model ---


def evaluate_model(cfg, d, say):
    """-m or --checkpoint: the harness's table on rank 0, and --output."""
    require_harness()
    if cfg.checkpoint:  # a local file: checked first, before the slower task index
        model = load_model(cfg.checkpoint)
        check_vocab(model, f"checkpoint {cfg.checkpoint}")
    else:
        check_model_path(cfg.model)
    tasks = task_list(cfg.tasks)
    if not tasks:
        raise UserError(f"--tasks is empty: pass harness task names, e.g. --tasks={DEFAULT_TASKS}")
    manager = task_manager(tasks, cfg.include_path)
    if cfg.model:  # its config, then (a download for a hub name) its weights
        check_hf_vocab(cfg.model)
        model = load_hf_model(cfg.model)
    autocast, dtype = make_autocast(cfg.dtype, d.device)
    say(f"{cfg.model or cfg.checkpoint} | {', '.join(tasks)} | {d.device} | {str(dtype).removeprefix('torch.')} | "
        f"{d.world_size} rank(s)", flush=True)
    lm = GPTLM(model.to(d.device), d.device, autocast, cfg.batch_size, d.rank, d.world_size, cfg.model or cfg.checkpoint)
    results = run_harness(lm, tasks, manager, cfg)
    if d.is_master:
        print_tables(results)
        if cfg.output:
            write_json(cfg.output, results)
            print(f"wrote {cfg.output}")


# --- every checkpoint of a run ---


RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
DONE_FILE = "evaluated.jsonl"  # in log_dir: one line per evaluation done, with its settings


def read_done(log_dir):
    """The evaluations noted in log_dir/evaluated.jsonl, and the (step, kind) of each line in log.txt."""
    done, logged = [], set()
    path = os.path.join(log_dir, DONE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            done = [json.loads(line) for line in f if line.endswith("\n")]  # a line cut short by a kill is not done
    log_file = os.path.join(log_dir, "log.txt")
    if os.path.exists(log_file):
        with open(log_file) as f:
            logged = {(int(p[0]), p[1]) for p in (line.split() for line in f) if len(p) == 3 and p[0].isdigit()}
    return done, logged


def evaluate_run(cfg, overridden, d, say):
    """--log_dir: each checkpoint's evaluations that are not done yet, appended to log.txt under its step."""
    if not os.path.isdir(cfg.log_dir):
        raise UserError(f"--log_dir={cfg.log_dir}: no such directory; pass the log_dir of a gpt2.py run")
    found = list_checkpoints(cfg.log_dir)
    if not found:
        raise UserError(f"no checkpoints (model_XXXXX.pt) in {cfg.log_dir}/: train with gpt2.py --checkpoint_every=N "
                        f"to write some")
    tasks = task_list(cfg.tasks) if "tasks" in overridden else []
    manager = None
    if tasks:
        require_harness()
        manager = task_manager(tasks, cfg.include_path)
    done, logged = read_done(cfg.log_dir)
    if dist.is_initialized():
        dist.barrier()  # every rank has read what is done before rank 0 adds to it
    log_file = os.path.join(cfg.log_dir, "log.txt")
    autocast, _ = make_autocast(cfg.dtype, d.device)
    hellaswag_data = {}  # examples by file, read once
    # a line per checkpoint with how far the run's checkpoints are: the ETA from the times of those evaluated (the
    # first included: what it reads once, HellaSwag's file, is small beside a checkpoint's evaluation), not skipped ones
    progress = Progress(len(found), skip=0)
    for i, (step, path) in enumerate(found, 1):
        ckpt = load_checkpoint(path)
        run = dataclasses.replace(RunConfig(), **{k: v for k, v in ckpt["config"].items() if k in RUN_FIELDS})
        name = os.path.basename(path)
        todo = jobs_to_do(cfg, tasks, run, name, step, done, logged)
        if not todo:
            progress.update(i, timed=False)
            say(f"{name}: evaluated already with these settings, skipped | checkpoint {progress.count()} | "
                f"{progress.times()}")
            continue
        model = GPT(model_config(run))
        model.load_state_dict(ckpt["model"])
        model.to(d.device).eval()
        del ckpt
        for job, settings in todo:
            if job == "val":
                loader = ValLoader(settings["data_dir"], settings["val_tokens"], run.micro_batch_size, run.block_size,
                                   d.rank, d.world_size, run.vocab_size)
                loss, bpb = evaluate_loss(model, loader, d.device, autocast)
                lines = [("val", f"{loss:.6f}"), ("bpb", f"{bpb:.6f}")]
                say(f"{name} (step {step}) | val loss {loss:.4f} | bpb {bpb:.4f} | {loader.n_tokens:,} tokens")
            elif job == "hella":
                check_vocab(model, f"checkpoint {path}", "pass --hellaswag=0")  # before the download
                if settings["file"] not in hellaswag_data:
                    hellaswag_data[settings["file"]] = load_hellaswag("val", settings["file"] or None, is_master=d.is_master,
                                                                      setting="--hellaswag_file")
                result = evaluate_hellaswag(model, hellaswag_data[settings["file"]], d.device, autocast, d.rank,
                                            d.world_size, cfg.batch_size)
                lines = [("hella", f"{result['acc_norm']:.4f}")]
                say(f"{name} (step {step}) | hellaswag acc_norm {result['acc_norm']:.4f} ({result['n']} examples)")
            else:
                check_vocab(model, f"checkpoint {path}", "leave --tasks out")
                lm = GPTLM(model, d.device, autocast, cfg.batch_size, d.rank, d.world_size, path)
                results = run_harness(lm, tasks, manager, cfg)
                lines = harness_lines(results) if d.is_master else []
                if d.is_master:
                    print_tables(results)
            if d.is_master:
                replaced = put_lines(log_file, step, lines)
                if replaced:
                    say(f"{name} (step {step}) | replaced in log.txt by this evaluation: "
                        + ", ".join(f"{k} {old} -> {new}" for k, old, new in replaced))
                with open(os.path.join(cfg.log_dir, DONE_FILE), "a") as f:
                    f.write(json.dumps({"checkpoint": name, "step": step, "job": job, "settings": settings,
                                        "kinds": [k for k, _ in lines]}) + "\n")
                logged |= {(step, k) for k, _ in lines}
        progress.update(i)
        say(f"{name} (step {step}) | evaluated | checkpoint {progress.count()} | {progress.times()}")
    if d.is_master and os.path.exists(log_file):
        make_plotter(log_file, os.path.join(cfg.log_dir, "log.png"))()


def jobs_to_do(cfg, tasks, run, name, step, done, logged):
    """The evaluations of checkpoint `name` that are not done yet: [(job, its settings)].

    A job is done when evaluated.jsonl notes it for this checkpoint with the same settings and its lines are still in
    log.txt (a resumed run cuts log.txt back) and not replaced by a later evaluation, or, for validation and HellaSwag
    with the settings the run trained with, when training logged its lines at this step and no evaluation replaced them.
    """
    jobs = [("val", {"data_dir": cfg.data_dir or run.data_dir, "val_tokens": cfg.val_tokens or run.val_tokens},
             {"data_dir": run.data_dir, "val_tokens": run.val_tokens})]
    if cfg.hellaswag:
        jobs.append(("hella", {"file": cfg.hellaswag_file or run.hellaswag_file}, {"file": run.hellaswag_file}))
    if tasks:
        jobs.append(("tasks", {"tasks": tasks, "include_path": cfg.include_path, "limit": cfg.limit}, None))
    training_kinds = {"val": ["val", "bpb"], "hella": ["hella"]}
    noted = [r for r in done if r["checkpoint"] == name]  # oldest first: each replaced the values it wrote
    later = [{k for r in noted[i + 1:] for k in r["kinds"]} for i in range(len(noted))]
    current = [all((step, k) in logged and k not in later[i] for k in r["kinds"]) for i, r in enumerate(noted)]
    replaced = {k for r in noted for k in r["kinds"]}  # not training's values any more
    todo = []
    for job, settings, own in jobs:
        if any((r["job"], r["settings"]) == (job, settings) and current[i] for i, r in enumerate(noted)):
            continue
        if settings == own and all((step, k) in logged and k not in replaced for k in training_kinds[job]):
            continue
        todo.append((job, settings))
    return todo


def put_lines(log_file, step, lines):
    """Writes lines [(kind, value)] to log_file under `step`; returns [(kind, old value, new value)] for the values
    they replace. With none to replace they are appended, as training appends its own. Else log.txt is rewritten (a
    temporary file renamed over it, so a reader sees the old log or the new) with each new value in the old one's
    place, and any further value of that kind at that step (an older evaluate.py appended them) dropped."""
    new = dict(lines)
    old = []
    if os.path.exists(log_file):
        with open(log_file) as f:
            old = [line for line in f if line.endswith("\n")]  # a line cut short by a kill is dropped
    kept, replaced = [], {}
    for line in old:
        p = line.split()
        if len(p) == 3 and p[0].isdigit() and int(p[0]) == step and p[1] in new:
            if p[1] not in replaced:
                kept.append(f"{step} {p[1]} {new[p[1]]}\n")
            replaced.setdefault(p[1], p[2])
        else:
            kept.append(line)
    added = [f"{step} {k} {v}\n" for k, v in lines if k not in replaced]
    if replaced:
        with open(f"{log_file}.tmp", "w") as f:
            f.writelines(kept + added)
        os.replace(f"{log_file}.tmp", log_file)
    else:
        with open(log_file, "a") as f:
            f.writelines(added)
    return [(k, replaced[k], v) for k, v in lines if k in replaced]


def harness_lines(results):
    """(kind, value) for log.txt from the harness's results: `<task>/<metric>`; the harness keys a metric
    "name,filter" (acc,none), and its other keys (alias, sample_len) are not metrics."""
    return [(f"{task}/{metric.replace(',none', '').replace(',', '_')}", f"{value:.6g}")
            for task, metrics in results["results"].items() for metric, value in metrics.items()
            if "," in metric and "_stderr" not in metric and isinstance(value, (int, float))]


# --- command line ---


def main(cfg, overridden):
    check_torch_version()
    check_settings(cfg, RULES, RELATIONS)
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        raise UserError(f"--include_path={cfg.include_path}: no such directory; pass a directory of task YAML files")
    d = setup_distributed(cfg.device)
    try:
        say = print if d.is_master else (lambda *args, **kwargs: None)
        if cfg.log_dir:
            evaluate_run(cfg, overridden, d, say)
        else:
            evaluate_model(cfg, d, say)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    run_cli(main, Config(), expand_aliases(sys.argv[1:]))
