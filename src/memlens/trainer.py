"""A small, reusable causal-LM trainer: AdamW, warm-up + decay, clipping, eval, resumable
checkpoints, a rich progress bar, and DDP under ``torchrun``.

    cfg = TrainConfig(steps=500, batch_size=16, lr=1e-3)
    result = train(model, blocks, cfg, out_dir)          # blocks: LongTensor (N, T) of token ids
    result.final_loss, result.train_seconds

    # anneal something every step (e.g. TopK's α), and run on several processes:
    train(model, blocks, cfg, out_dir, callbacks=[lambda step, total: set_alpha(1 - step / total)])
    torchrun --nproc_per_node 2 script.py                # same code; gloo on CPU, nccl on GPU

Data order is a pure function of (seed, step): the global batch of step s is rows
``perm[s*B:(s+1)*B]`` of a seeded permutation per epoch, and under DDP rank r takes the r-th
contiguous slice of it. So 1 process and N processes with the same global batch see the same
tokens and reach the same loss up to float rounding, and a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memlens.errors import InvalidArgument

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # GLOBAL batch in sequences (split across DDP ranks)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up from 0
    schedule: str = "cosine"  # decay after warm-up: "cosine" | "linear" | "constant"
    weight_decay: float = 0.1  # AdamW, on ≥2-D weights only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    eval_every: int = 0  # steps between evals of `eval_data` (0 = only at the end)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = none)
    keep_checkpoint: bool = False  # keep checkpoint.pt after a successful run
    log_every: int = 10  # steps between progress-bar / history updates
    seed: int = 0  # data order and init-independent randomness
    num_threads: int = 2  # torch CPU threads (≤ cores; set None to leave alone)
    bf16: bool = False  # bf16 autocast for forward/backward (master weights stay fp32)
    progress: bool = True  # rich progress bar (rank 0 only)


@dataclass
class TrainResult:
    steps: int
    final_loss: float  # mean training loss over the last `log_every` steps
    train_seconds: float  # wall time of this call (excludes time before a resume)
    tokens: int  # tokens processed in total (all ranks, all sessions)
    world_size: int = 1
    resumed_from: int = 0  # step a checkpoint was resumed from (0 = fresh)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- distributed

def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the default process group when run under torchrun (gloo on CPU, nccl on GPU).

    Returns (rank, world_size, device). Idempotent; a no-op for a single process.
    """
    import torch.distributed as dist

    rank, world, local = dist_info()
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warm-up, then cosine/linear decay to min."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, t)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of the global batch of `step` (epochs of seeded permutations)."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[pos: pos + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def _rows(data, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[idx]
    return torch.stack([torch.as_tensor(data[i]) for i in idx.tolist()])


def _loss(model, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else _nullctx()
    with ctx:
        out = model(input_ids=x, labels=x)
    return out.loss.float()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def evaluate_loss(model, data, batch_size: int = 32, bf16: bool = False) -> float:
    """Mean LM loss over all rows of `data` (LongTensor (N, T))."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = _rows(data, torch.arange(i, min(len(data), i + batch_size)))
        dev = next(model.parameters()).device
        total += _loss(model, x.to(dev), bf16).item() * len(x)
        n += len(x)
    model.train(was)
    return total / max(1, n)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: Path, model, opt, sched, step: int, tokens: int, history) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "step": step, "tokens": tokens, "history": history,
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
    }, tmp)
    os.replace(tmp, path)


def train(model, data, cfg: TrainConfig, out_dir: str | Path | None = None, *, eval_data=None,
          callbacks: Sequence[Callable[[int, int], None]] = ()) -> TrainResult:
    """Train `model` (a HF causal LM) in place on token blocks and return a `TrainResult`.

    data: LongTensor (N, T) — or any sequence of equal-length 1-D token tensors — of training
      sequences; each is a full input (labels = inputs, shifted inside the model).
    cfg: see `TrainConfig`; `cfg.batch_size` is the global batch and must divide by the world size.
    out_dir: where `checkpoint.pt` is written every `cfg.checkpoint_every` steps; if one is there
      at start, training resumes from it (model, optimizer, scheduler, rng, step).
    eval_data: optional LongTensor (M, T); its loss is logged every `cfg.eval_every` steps and at
      the end.
    callbacks: functions `f(step, total_steps)` called before every optimizer step (e.g. to
      anneal TopK's α); they run on every rank.
    Under ``torchrun`` the model is wrapped in DDP (gloo on CPU, nccl on GPU); progress and
    checkpoints are handled by rank 0 only.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, world, device = init_distributed()
    if cfg.batch_size % world:
        raise InvalidArgument(f"global batch {cfg.batch_size} does not divide by world size {world}")
    local_bs = cfg.batch_size // world
    model.to(device)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if ckpt is not None and rank == 0:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.with_suffix(".tmp").unlink(missing_ok=True)  # a checkpoint write killed half-way
    start, tokens, history = _resume(ckpt, model, opt, sched, device)
    wrapped = _distributed(model, world, device)
    seq_len = _rows(data, torch.tensor([0])).shape[1]
    result = TrainResult(steps=cfg.steps, final_loss=float("nan"), train_seconds=0.0,
                         tokens=tokens, world_size=world, resumed_from=start, history=history)
    bar = _Bar(cfg.steps, start, enabled=cfg.progress and rank == 0)
    t0 = time.perf_counter()
    recent: list[float] = []
    with bar:
        for step in range(start, cfg.steps):
            for cb in callbacks:
                (cb.on_step if hasattr(cb, "on_step") else cb)(step, cfg.steps)
            idx = batch_indices(len(data), step, cfg.batch_size, cfg.seed)
            x = _rows(data, idx[rank * local_bs:(rank + 1) * local_bs]).to(device)
            loss = _loss(wrapped, x, cfg.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            tokens += cfg.batch_size * seq_len
            recent.append(_mean_over_ranks(loss.detach(), world))
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                mean = sum(recent) / len(recent)
                history.append((done, mean))
                result.final_loss = mean
                recent = []
                dt = time.perf_counter() - t0
                bar.update(done, mean, (tokens - result.tokens) / max(dt, 1e-9))
            if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0:
                result.eval_losses.append((done, evaluate_loss(model, eval_data, bf16=cfg.bf16)))
            if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                    and done < cfg.steps and rank == 0:
                _save_checkpoint(ckpt, model, opt, sched, done, tokens, history)
    if recent:
        result.final_loss = sum(recent) / len(recent)
    if eval_data is not None and (not result.eval_losses or result.eval_losses[-1][0] != cfg.steps):
        result.eval_losses.append((cfg.steps, evaluate_loss(model, eval_data, bf16=cfg.bf16)))
    result.train_seconds = time.perf_counter() - t0
    result.tokens = tokens
    model.eval()
    if ckpt is not None and rank == 0 and not cfg.keep_checkpoint and ckpt.exists():
        ckpt.unlink()
    return result


def _resume(ckpt: Path | None, model, opt, sched, device) -> tuple[int, int, list]:
    """(step, tokens, history) of the checkpoint at ``ckpt``, whose model, optimizer,
    scheduler and random states are restored; (0, 0, []) without one."""
    if ckpt is None or not ckpt.exists():
        return 0, 0, []
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["tokens"], [tuple(h) for h in state["history"]]


def _distributed(model, world: int, device: torch.device):
    """``model`` wrapped in DDP when several processes train it, else ``model``."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    """The loss averaged over the DDP ranks (every rank gets it)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(loss)
        loss = loss / world
    return loss.item()


class _Bar:
    """Rich progress bar with loss and tokens/s; a no-op when disabled."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"),
                              TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(),
                              TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.p.add_task("train", total=total, completed=start, loss="-", tps="-")

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *a):
        if self.enabled:
            self.p.__exit__(*a)
        return False

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.enabled:
            self.p.update(self.task, completed=step, loss=f"{loss:.3f}", tps=f"{tps:,.0f}")
