"""The optimizers of --optimizer=muon, apart from the model: gpt2.py imports this file, and it never imports gpt2.py.

MuonAdamW is torch.optim.Muon for the weight matrices inside the blocks and torch.optim.AdamW for the rest, behind one
optimizer's interface. In one process and under DDP its Muon is torch.optim.Muon itself. Under FSDP2 (--fsdp=1), where
each rank holds only some rows of every matrix, it is ShardedMuon: torch.optim.Muon's update, computed by torch's own
functions, with each matrix made whole on one owner rank only (Moonlight's distributed Muon, VeOmni's FSDP2 Muon,
nanochat's DistMuon do the same).

    import muon
    optimizer = muon.MuonAdamW(torch.optim.AdamW(others), [(c_attn.weight, 3), (c_proj.weight, 1)], lr=0.02,
                               momentum=0.95, weight_decay=0.0, lr_scale=0.02 / 6e-4)

gpt2.GPT.configure_optimizers builds it for --optimizer=muon; docs/muon.md says what it does and how it
is tested.
"""

import inspect

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim import _muon  # torch.optim.Muon's Newton-Schulz iteration and learning-rate adjustment: called, not copied

from cli import UserError

# what Muon's matrices travel between ranks in: torch's Newton-Schulz casts its input to bfloat16 before anything else,
# so sending bfloat16 gives the owner the very input it would have made, for half the bytes of float32
WIRE = torch.bfloat16

# the private functions of torch.optim._muon that ShardedMuon calls, with the arguments it passes them, in order. Being
# private, a torch release may rename them or make them take more without notice (one revision's Newton-Schulz takes a
# required use_addmm), and that would be a TypeError at the first step, maybe hours in: check_torch_muon checks at the start
TORCH_CALLS = {"_zeropower_via_newtonschulz": ("grad", "ns_coefficients", "ns_steps", "eps"),
               "_adjust_lr": ("lr", "adjust_lr_fn", "param_shape")}


def check_torch_muon(module=_muon, version=torch.__version__):
    """A one-line UserError where `module` (torch.optim._muon) lacks a function of TORCH_CALLS or the arguments
    ShardedMuon passes it do not bind to its signature."""
    for name, args in TORCH_CALLS.items():
        function = getattr(module, name, None)
        if function is None:
            problem = "is missing"
        else:
            try:
                signature = inspect.signature(function)
            except ValueError:  # no signature to read (compiled code): only the call can tell
                continue
            try:
                signature.bind(*args)
                continue
            except TypeError as e:  # e.g. missing a required argument: 'use_addmm'
                problem = f"takes {signature} ({e})"
        raise UserError(f"torch {version}: torch.optim._muon.{name}, which Muon under FSDP (--optimizer=muon --fsdp=1) "
                        f"calls as {name}({', '.join(args)}), {problem}: use torch 2.9-2.13, or --optimizer=adamw, or "
                        f"--fsdp=0 (torch.optim.Muon itself)")


def is_dtensor(t):
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class MuonAdamW:
    """torch.optim.Muon for the weight matrices inside the blocks, torch.optim.AdamW for the rest (embeddings, lm_head,
    biases, LayerNorm gains), as the modded-nanogpt speedrun and nanochat train them, behind one torch optimizer's
    interface: param_groups (AdamW's, then Muon's), zero_grad, step, and state_dict / load_state_dict in torch's
    format, the state numbered over those groups in that order. So the training loop, the clipping and the checkpoint
    code treat it as they treat AdamW.

    Muon replaces each matrix's momentum by the nearest orthogonal matrix (a Newton-Schulz iteration inside
    torch.optim.Muon), so that every direction of the update moves by the same amount. The fused c_attn weight (3C, C)
    is three matrices, q, k and v, and each is orthogonalized on its own, as the speedrun does: Muon holds three
    (C, C) leaf tensors that share the fused weight's memory (its row blocks), so its in-place update writes into the
    fused weight, and before each step their gradients are pointed at the same row blocks of the fused gradient.

    Under FSDP (the matrices are DTensors) Muon is ShardedMuon, which keeps c_attn whole, with its momentum sharded as
    the weight is, and orthogonalizes its three pieces apart. Its state_dict numbers c_attn once; checkpoint_state and
    own_state translate to and from one process's numbering (q, k and v apart), which is what checkpoints hold.

    The schedule sets each group's lr to the scheduled lr times the group's lr_scale (1 when absent): Muon's groups
    carry muon_lr / max_lr. Resuming, the state comes from the checkpoint and the settings from this run's config.
    """

    def __init__(self, adamw, matrices, lr, momentum, weight_decay, lr_scale):
        self.adamw = adamw
        self.split = []  # (fused weight, the leaf views of its row blocks that Muon updates)
        self.sharded = bool(matrices) and is_dtensor(matrices[0][0])
        if self.sharded:
            self.muon = ShardedMuon(matrices, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            muon_params = []
            for weight, pieces in matrices:
                if pieces == 1:
                    muon_params.append(weight)
                else:
                    views = [nn.Parameter(rows) for rows in weight.detach().chunk(pieces)]  # each (C, C), in weight's memory
                    self.split.append((weight, views))
                    muon_params += views
                    # once backward has made the fused gradient, the views' gradients are its row blocks, so that whatever
                    # reads param_groups before step (GradScaler's unscale_ and overflow check) sees and edits all of it
                    weight.register_post_accumulate_grad_hook(lambda w, views=views: self._share_grad(w, views))
            self.muon = torch.optim.Muon(muon_params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
        for group in self.muon.param_groups:
            group["lr_scale"] = lr_scale

    @property
    def param_groups(self):
        return self.adamw.param_groups + self.muon.param_groups  # the groups themselves: setting their lr sets it

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)
        for weight, _ in self.split:  # in neither optimizer's lists (Muon holds its views): else its gradient accumulates
            if set_to_none:
                weight.grad = None
            elif weight.grad is not None:
                weight.grad.zero_()

    @staticmethod
    def _share_grad(weight, views):
        pieces = weight.grad.chunk(len(views)) if weight.grad is not None else [None] * len(views)
        for view, grad in zip(views, pieces, strict=True):
            view.grad = grad  # a view: the clipped, all-reduced fused gradient, never a copy

    @torch.no_grad()
    def step(self):
        for weight, views in self.split:  # again, for a gradient that was set, not accumulated by backward
            self._share_grad(weight, views)
        self.adamw.step()
        self.muon.step()  # under FSDP a collective: every rank steps

    def state_dict(self):
        adamw, muon = self.adamw.state_dict(), self.muon.state_dict()
        shift = sum(len(group["params"]) for group in adamw["param_groups"])  # Muon's parameters are numbered after
        groups = adamw["param_groups"] + [{**g, "params": [i + shift for i in g["params"]]} for g in muon["param_groups"]]
        return {"state": {**adamw["state"], **{i + shift: s for i, s in muon["state"].items()}}, "param_groups": groups}

    def load_state_dict(self, state):
        n = len(self.adamw.param_groups)
        for optimizer, groups in ((self.adamw, state["param_groups"][:n]), (self.muon, state["param_groups"][n:])):
            numbers = {i for group in groups for i in group["params"]}
            settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            # torch matches the numbers to this optimizer's parameters by their order in the groups, not by value
            optimizer.load_state_dict({"state": {i: s for i, s in state["state"].items() if i in numbers},
                                       "param_groups": groups})
            for group, kept in zip(optimizer.param_groups, settings, strict=True):
                group.update(kept)  # e.g. a --muon_lr given on resuming

    def _piece_numbers(self):
        """(the number of AdamW's parameters, {the number state_dict gives a Muon matrix: the numbers one process gives
        its pieces}), under FSDP."""
        shift = sum(len(group["params"]) for group in self.adamw.param_groups)
        own, checkpoint, numbers = shift, shift, {}
        for group in self.muon.param_groups:
            for p in group["params"]:
                numbers[own] = list(range(checkpoint, checkpoint + self.muon.pieces[p]))
                own, checkpoint = own + 1, checkpoint + self.muon.pieces[p]
        return shift, numbers

    def checkpoint_state(self, state):
        """A state_dict() holding whole tensors (gathered from the shards) in one process's numbering, the one checkpoints
        keep: under FSDP c_attn's momentum, one (3C, C) tensor here, becomes q's, k's and v's (views of it)."""
        if not self.sharded:
            return state
        _, numbers = self._piece_numbers()
        out = {}
        for i, entry in state["state"].items():
            pieces = numbers.get(i, [i])
            for j, n in enumerate(pieces):
                out[n] = {k: v.chunk(len(pieces))[j] if len(pieces) > 1 and torch.is_tensor(v) else v for k, v in entry.items()}
        groups = [{**g, "params": [n for i in g["params"] for n in numbers.get(i, [i])]} for g in state["param_groups"]]
        return {"state": out, "param_groups": groups}

    def own_state(self, state):
        """checkpoint_state's inverse: a checkpoint's optimizer state in this optimizer's numbering. Under FSDP c_attn's
        momentum becomes the list of q's, k's and v's, to be stacked (torch.cat) into the (3C, C) whole, then sliced."""
        if not self.sharded:
            return state
        shift, numbers = self._piece_numbers()
        own = {pieces[0]: i for i, pieces in numbers.items()}  # a matrix's first piece: its own number
        out = {i: entry for i, entry in state["state"].items() if i < shift}  # AdamW's, as they are
        for i, pieces in numbers.items():
            if pieces[0] in state["state"]:
                entries = [state["state"][n] for n in pieces]
                out[i] = {k: [e[k] for e in entries] if torch.is_tensor(v) and len(pieces) > 1 else v
                          for k, v in entries[0].items()}
        groups = [{**g, "params": [n if n < shift else own[n] for n in g["params"] if n < shift or n in own]}
                  for g in state["param_groups"]]
        return {"state": out, "param_groups": groups}


def balance(sizes, world_size):
    """The owner rank of each matrix: largest first, each to the rank with the least so far (ties: the lowest rank),
    so that the owners' Newton-Schulz work is balanced by size, not by count. Ranks beyond the matrices own none."""
    load, owner = [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # stable: equal sizes in their order
        owner[i] = min(range(world_size), key=load.__getitem__)
        load[owner[i]] += sizes[i]
    return owner


def rounds(shapes, world_size):
    """The step's rounds: in round k each rank orthogonalizes the k-th largest matrix it owns (balance), so a list of
    rounds, each a list over the ranks of an index into shapes or None (that rank owns no more)."""
    owner = balance([rows * cols for rows, cols in shapes], world_size)
    largest_first = sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1])
    queues = [[i for i in largest_first if owner[i] == rank] for rank in range(world_size)]
    return [[queue[k] if k < len(queue) else None for queue in queues] for k in range(max(map(len, queues), default=0))]


def step_bytes(shapes, pieces, world_size, rank=None):
    """The most memory ShardedMuon.step holds at once on `rank` (default: on any rank) beyond its state, in bytes, for
    matrices of these shapes split into these numbers of pieces: in a round, the bfloat16 buffer of this rank's rows of
    the round's matrices (sent, then received back), and either, while it fills that buffer, one float32 Nesterov
    update of its rows, or the whole matrix it owns (bfloat16, padded to world_size equal parts) and, while torch's
    Newton-Schulz works on a piece of shape (a, b), its two latest iterates (a x b each) and two min(a, b)-square Gram
    matrices. estimate_memory adds this for --optimizer=muon under FSDP."""
    padded = lambda i: -(-shapes[i][0] // world_size) * shapes[i][1]  # one rank's rows of matrix i, padded
    ranks = range(world_size) if rank is None else [rank]
    mine = lambda i, r: max(0, min(shapes[i][0] - r * -(-shapes[i][0] // world_size), -(-shapes[i][0] // world_size)))
    most = 0
    for batch in rounds(shapes, world_size):
        sent = sum(padded(i) for i in batch if i is not None)
        most = max(most, sent + max(2 * mine(i, r) * shapes[i][1] for i in batch if i is not None for r in ranks))
        for owner, i in enumerate(batch):
            if owner in ranks:
                a, b = (shapes[i][0] // pieces[i], shapes[i][1]) if i is not None else (0, 0)
                own = world_size * padded(i) if i is not None else 0
                most = max(most, sent + own + 2 * a * b + 2 * min(a, b) ** 2)
    return WIRE.itemsize * most


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for matrices that FSDP2 shards by rows (DTensors placed Shard(0) on a 1-D mesh): each matrix
    gets the update torch.optim.Muon gives it whole in one process, and no rank ever holds more than one whole matrix.

    Each matrix has one owner rank, fixed at the start (balance: by size). A step runs in rounds (rounds()): in each,
    every rank orthogonalizes at most one matrix it owns, and on every rank together (a collective):
    1. momentum: each rank updates its rows of the momentum of the round's matrices with its rows of their gradients,
       as torch.optim.Muon does (lerp, then Nesterov's lerp): elementwise, so the sharded momentum is exactly the
       whole one's rows;
    2. to the owners: one all_to_all_single sends each rank's rows of each Nesterov update, in bfloat16 (WIRE), to
       that matrix's owner, where they arrive stacked: the whole matrix;
    3. the owner orthogonalizes it with torch's own Newton-Schulz (torch.optim._muon._zeropower_via_newtonschulz),
       piece by piece (c_attn: q, k and v apart), in place;
    4. back: a second all_to_all_single returns each rank its rows of the orthogonalized updates;
    5. each rank applies the decoupled weight decay and the update to its rows, at the learning rate torch adjusts for
       the piece's shape (_adjust_lr).
    Rows are split as FSDP2 splits them (torch.chunk: ceil(rows / world_size) per rank, the last ranks fewer or none);
    each rank's part travels padded to that size, so that the whole arrives as one (world_size * that, cols) block.
    No rank gathers every matrix, each matrix is orthogonalized once in the job, and whole matrices exist only on their
    owner, one at a time (step_bytes counts what a step holds).

    The state is torch.optim.Muon's, a momentum_buffer per matrix, here a DTensor sharded as its weight.
    matrices: (weight, pieces) pairs, the weight split into `pieces` equal row blocks that are orthogonalized apart.
    """

    def __init__(self, matrices, lr, momentum, weight_decay):
        check_torch_muon()
        weights = [w for w, _ in matrices]
        super().__init__(weights, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
        self.pieces = {w: pieces for w, pieces in matrices}  # keyed by the parameter itself, as torch keys its state
        mesh = weights[0].device_mesh
        self.rounds = [[weights[i] if i is not None else None for i in batch]
                       for batch in rounds([tuple(w.shape) for w in weights], mesh.size())]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = {p: group for group in self.param_groups for p in group["params"] if p.grad is not None}
        for batch in self.rounds:
            batch = [p if p in groups else None for p in batch]  # the matrix each rank orthogonalizes in this round
            if any(p is not None for p in batch):
                self._round(batch, groups)
        return loss

    def _round(self, batch, groups):
        first = next(p for p in batch if p is not None)
        mesh, device = first.device_mesh, first.to_local().device
        world, rank, pg = mesh.size(), mesh.get_local_rank(), mesh.get_group()
        rows = lambda p: -(-p.shape[0] // world)  # each rank's rows of p, padded
        sizes = [rows(p) * p.shape[1] if p is not None else 0 for p in batch]
        send = torch.zeros(sum(sizes), dtype=WIRE, device=device)  # this rank's rows of each rank's matrix, in rank order
        for p, part in zip(batch, send.split(sizes), strict=True):
            if p is not None:
                self._nesterov(p, groups[p], out=part)
        recv = torch.empty(world * sizes[rank], dtype=WIRE, device=device)
        dist.all_to_all_single(recv, send, [sizes[rank]] * world, sizes, group=pg)  # to the owners
        own = batch[rank]
        if own is not None:
            group = groups[own]
            whole = recv.view(world * rows(own), own.shape[1])[:own.shape[0]]  # (rows, cols): every rank's rows, stacked
            for piece in whole.chunk(self.pieces[own]):
                piece.copy_(_muon._zeropower_via_newtonschulz(piece, group["ns_coefficients"], group["ns_steps"],
                                                              group["eps"]))
        dist.all_to_all_single(send, recv, sizes, [sizes[rank]] * world, group=pg)  # and back
        del recv
        for p, part in zip(batch, send.split(sizes), strict=True):
            if p is not None:
                local, group = p.to_local(), groups[p]
                lr = group["lr"]
                local.mul_(1 - lr * group["weight_decay"])
                local.add_(part[:local.numel()].view_as(local),
                           alpha=-_muon._adjust_lr(lr, group["adjust_lr_fn"], (p.shape[0] // self.pieces[p], p.shape[1])))

    def _nesterov(self, p, group, out):
        """torch.optim.Muon's momentum on this rank's rows of p: updates the momentum buffer and writes the Nesterov
        update into the start of out (WIRE; the rest is padding)."""
        grad, state = p.grad.to_local(), self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor sharded as p
        buf = state["momentum_buffer"].to_local()
        buf.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        out[:update.numel()].view_as(update).copy_(update)
