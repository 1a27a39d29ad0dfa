"""Train a TopK LM and its dense twin on the same data, init and budget; compare them.

    corpus = organism_corpus("organism:facts-gpt2")
    train, heldout = text_blocks(corpus.tokenizer, corpus.text)
    pair = train_pair(corpus.config, corpus.tokenizer, train, heldout, TopKTrainConfig(steps=300),
                      out_dir="runs/topk")
    pair.topk.heldout_ppl, pair.dense.heldout_ppl, pair.ppl_ratio
    pair.topk.sparsity[0]          # {'layer': 0, 'nonzero_mean': 64.0, 'nonzero_max': 64, ...}

Both models start from the same seeded initialisation (TopK adds no parameters) and see the
same batches in the same order (the organisms trainer's data order is a function of seed and
step). The TopK model anneals α from 1 (dense) to 0 (TopK) over the first ``anneal_ratio`` of
the steps through a per-step trainer callback. Under ``torchrun`` the trainer runs DDP; only
rank 0 writes files. Each model's directory is complete once ``train_result.json`` exists; a
finished model is loaded instead of retrained, an interrupted one resumes from its checkpoint.

The TopK model also keeps snapshots over training (``cfg.keep_steps``; by default the log-spaced
:func:`log_steps` 10, 20, 50, 100, 200, … and the last step): ``out_dir/topk/snapshots/
step-000050/`` is a HF model directory of the weights after 50 optimizer steps whose
``config.topk["alpha"]`` is the annealing weight α of the step that produced them, with
``snapshot.json`` ({"step", "alpha", "total_steps"}). :func:`list_snapshots` finds them.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlens import hooks
from memlens.arch import adapter_for
from memlens.topk_mlp import TopKError, alpha_at, set_alpha, to_topk

RESULT_FILE = "train_result.json"
SETTINGS_FILE = "train_settings.json"
SNAPSHOTS = "snapshots"  # under the TopK model's directory
SNAPSHOT_FILE = "snapshot.json"


@dataclass
class TopKTrainConfig:
    """Settings of a TopK / dense-twin training run (paper optimiser, organism-sized budget)."""

    k: int | None = None  # units kept per position; None → d_ff // 16 (64 for d_ff = 1024)
    activation: str = "relu"  # f of the TopK activation
    n_last_nontopk: int = 2  # final layers that stay dense
    anneal_ratio: float = 0.2  # α: 1 → 0 linearly over this share of the steps
    steps: int = 300  # optimizer steps per model
    batch_size: int = 16  # sequences per step (global, split over DDP ranks)
    lr: float = 2e-3  # ours: the paper's 3e-4 is too slow for a minutes-long budget
    warmup_steps: int = 30
    weight_decay: float = 0.1  # paper
    betas: tuple[float, float] = (0.9, 0.95)  # paper
    eps: float = 1e-8  # paper
    grad_clip: float = 1.0  # ours (paper: 10); organisms train at a 7× higher lr
    seed: int = 0  # initialisation and data order, shared by both models
    bf16: bool = False  # bf16 autocast for forward/backward (master weights stay float32)
    checkpoint_every: int = 100  # steps between resumable checkpoints (0 = none)
    keep_steps: tuple[int, ...] | None = None  # TopK snapshots; None → log_steps(steps), () none
    num_threads: int = 2
    progress: bool = True

    def resolved_k(self, d_ff: int) -> int:
        return self.k if self.k is not None else max(1, d_ff // 16)

    def snapshot_steps(self) -> list[int]:
        """The steps after which the TopK model is snapshotted (sorted, within 1 … steps)."""
        steps = log_steps(self.steps) if self.keep_steps is None else self.keep_steps
        bad = [s for s in steps if not 1 <= int(s) <= self.steps]
        if bad:
            raise TopKError(f"keep_steps {bad} lie outside 1 … {self.steps}")
        return sorted({int(s) for s in steps})


def log_steps(total: int, start: int = 10) -> list[int]:
    """Log-spaced steps 1-2-5 per decade from ``start`` up to ``total``, plus ``total``.

        log_steps(300) == [10, 20, 50, 100, 200, 300]
    """
    steps, decade = [], start
    while decade <= total:
        steps += [m * decade for m in (1, 2, 5) if m * decade <= total]
        decade *= 10
    return sorted(set(steps) | {total}) if total >= 1 else []


@dataclass
class ModelReport:
    """One trained model: held-out perplexity, speed, and the sparsity of its MLP hidden states."""

    name: str  # "topk" or "dense"
    path: str  # saved HF model directory
    heldout_loss: float  # mean next-token NLL (nats) on held-out blocks
    heldout_ppl: float  # exp(heldout_loss)
    train_seconds: float
    tokens: int
    tokens_per_second: float
    final_train_loss: float
    sparsity: list[dict[str, Any]] = field(default_factory=list)  # per layer, see sparsity_report
    topk: dict | None = None  # the model's config.topk (None for the dense twin)


@dataclass
class PairResult:
    """The TopK model and its dense twin, trained alike."""

    topk: ModelReport
    dense: ModelReport
    config: dict

    @property
    def ppl_ratio(self) -> float:
        """Held-out perplexity of the TopK model over that of its dense twin."""
        return self.topk.heldout_ppl / self.dense.heldout_ppl

    def to_dict(self) -> dict:
        return {"topk": asdict(self.topk), "dense": asdict(self.dense), "config": self.config,
                "ppl_ratio": self.ppl_ratio,
                "speed_ratio": self.topk.tokens_per_second / self.dense.tokens_per_second}


class AlphaSchedule:
    """Trainer callback: before optimizer step s, set α = alpha_at(s, total, anneal_ratio)."""

    def __init__(self, model: nn.Module, anneal_ratio: float):
        self.model = model
        self.anneal_ratio = anneal_ratio

    def on_step(self, step: int, total_steps: int) -> None:
        set_alpha(self.model, alpha_at(step, total_steps, self.anneal_ratio))


class Snapshots:
    """Trainer callback: at the start of step s (= after s optimizer steps), if s is one of
    ``steps``, save the model into ``root/step-{s:06d}/`` with the α it was trained at in its
    last step. Runs before :class:`AlphaSchedule`, so the α read is still that of step s − 1.
    The last step has no following callback: :func:`train_one` calls :meth:`save` itself.
    Only rank 0 writes; a snapshot is written beside its place and renamed, and a resumed run
    rewrites the snapshots it passes again (the data order is a function of seed and step)."""

    def __init__(self, model: nn.Module, root: str | Path, steps, tokenizer=None):
        self.model = model
        self.root = Path(root)
        self.steps = set(int(s) for s in steps)
        self.tokenizer = tokenizer

    def on_step(self, step: int, total_steps: int) -> None:
        if step in self.steps:
            self.save(step, total_steps)

    def save(self, step: int, total_steps: int) -> Path | None:
        import shutil

        from memlens.trainer import dist_info

        target = snapshot_dir(self.root, step)
        if dist_info()[0] != 0:
            return None
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        was_training = self.model.training
        self.model.save_pretrained(tmp)  # config.topk carries the current α
        self.model.train(was_training)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        alpha = (self.model.config.topk or {}).get("alpha", 0.0)
        (tmp / SNAPSHOT_FILE).write_text(json.dumps(
            {"step": step, "alpha": alpha, "total_steps": total_steps}, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target


def snapshot_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_snapshots(run: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete snapshot of a run, by step. ``run`` is a pair's
    directory (``run/topk/snapshots``), a TopK model's (``run/snapshots``) or the snapshots
    directory itself.

        list_snapshots("runs/topk")   # [(10, Path('runs/topk/topk/snapshots/step-000010')), …]
    """
    run = Path(run)
    for root in (run / "topk" / SNAPSHOTS, run / SNAPSHOTS, run):
        found = sorted((json.loads((d / SNAPSHOT_FILE).read_text())["step"], d)
                       for d in root.glob("step-*") if (d / SNAPSHOT_FILE).is_file()) \
            if root.is_dir() else []
        if found:
            return found
    return []


def fresh_model(config, seed: int) -> nn.Module:
    """A newly initialised HF causal LM of ``config`` (seeded, so twins start identical)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config))


@torch.no_grad()
def sparsity_report(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16
                    ) -> list[dict[str, Any]]:
    """Per layer: non-zeros per token of the MLP hidden state (``blocks.L.mlp.hook_post``, the
    tensor that feeds the output matrix) — mean, min, max — and the dead-neuron fraction, the
    share of the d_ff units that are zero on every token of ``blocks``.

        sparsity_report(model, heldout)[0]["nonzero_max"]   # == k in a TopK layer
    """
    adapter = adapter_for(model)
    n_layers = adapter.n_layers
    count = [0] * n_layers
    total = [0.0] * n_layers
    low = [math.inf] * n_layers
    high = [0] * n_layers
    alive: list[torch.Tensor | None] = [None] * n_layers

    def recorder(layer: int):
        def record(hidden: torch.Tensor) -> None:  # (B, T, d_ff)
            nonzero = hidden != 0
            per_token = nonzero.sum(-1).flatten()
            count[layer] += per_token.numel()
            total[layer] += per_token.sum().item()
            low[layer] = min(low[layer], per_token.min().item())
            high[layer] = max(high[layer], per_token.max().item())
            fired = nonzero.flatten(0, -2).any(0)  # (d_ff,)
            alive[layer] = fired if alive[layer] is None else alive[layer] | fired

        return record

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with hooks.hooked(model, {f"blocks.{layer}.mlp.hook_post": recorder(layer)
                              for layer in range(n_layers)}):
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size].to(device)
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
    model.train(was_training)
    return [{"layer": layer, "nonzero_mean": total[layer] / count[layer],
             "nonzero_min": int(low[layer]), "nonzero_max": int(high[layer]),
             "d_ff": int(alive[layer].numel()),
             "dead_fraction": 1.0 - alive[layer].float().mean().item()}
            for layer in range(n_layers)]


def run_settings(cfg: TopKTrainConfig | None) -> dict | None:
    """The settings that determine a trained model (not progress, threads, checkpointing,
    snapshots)."""
    if cfg is None:
        return None
    data = json.loads(json.dumps(asdict(cfg)))
    for key in ("progress", "num_threads", "checkpoint_every", "keep_steps"):
        data.pop(key)
    if not data["bf16"]:
        data.pop("bf16")  # runs from before the option keep their names and settings
    return data


def train_one(
    name: str,
    config,
    tokenizer,
    train_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    cfg: TopKTrainConfig,
    out_dir: str | Path,
) -> tuple[nn.Module, ModelReport]:
    """Train (or load, if finished before) the ``"topk"`` or ``"dense"`` model into ``out_dir``."""
    from transformers import AutoModelForCausalLM

    from memlens.topk_mlp import apply_topk_from_config
    from memlens.trainer import TrainConfig, dist_info, evaluate_loss, train

    out = Path(out_dir)
    done = out / RESULT_FILE
    settings = run_settings(cfg)
    if done.is_file():
        saved = json.loads((out / SETTINGS_FILE).read_text())
        if settings is not None and saved != settings:
            changed = sorted(key for key in settings if settings[key] != saved.get(key))
            raise TopKError(f"{out} holds a finished run with other settings ({changed}); "
                            "choose another output directory")
        model = AutoModelForCausalLM.from_pretrained(out)
        if getattr(model.config, "topk", None):
            apply_topk_from_config(model)
        return model.eval(), ModelReport(**json.loads(done.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    model = fresh_model(config, cfg.seed)
    callbacks = []
    if name == "topk":
        d_ff = adapter_for(model).get_edit_weight(model, 0).shape[1]
        to_topk(model, cfg.resolved_k(d_ff), activation=cfg.activation,
                n_last_nontopk=cfg.n_last_nontopk, anneal_ratio=cfg.anneal_ratio,
                alpha=1.0 if cfg.anneal_ratio > 0 else 0.0)
        snapshots = Snapshots(model, out / SNAPSHOTS, cfg.snapshot_steps(), tokenizer)
        callbacks += [snapshots, AlphaSchedule(model, cfg.anneal_ratio)]  # snapshot first
    trainer_cfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps, grad_clip=cfg.grad_clip,
        seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, num_threads=cfg.num_threads,
        progress=cfg.progress, log_every=10, bf16=cfg.bf16,
    )
    result = train(model, train_blocks, trainer_cfg, out, callbacks=callbacks)
    session_tokens = (cfg.steps - result.resumed_from) * cfg.batch_size * train_blocks.shape[1]
    if name == "topk":
        if cfg.steps in snapshots.steps:
            snapshots.save(cfg.steps, cfg.steps)  # α of the last step (0 once annealed)
        set_alpha(model, 0.0)  # annealing is over: the saved model is a pure TopK LM
    heldout_loss = evaluate_loss(model, heldout_blocks)
    report = ModelReport(
        name=name, path=str(out), heldout_loss=heldout_loss, heldout_ppl=math.exp(heldout_loss),
        train_seconds=result.train_seconds, tokens=result.tokens,
        tokens_per_second=session_tokens / max(result.train_seconds, 1e-9),
        final_train_loss=result.final_loss, sparsity=sparsity_report(model, heldout_blocks),
        topk=getattr(model.config, "topk", None),
    )
    if dist_info()[0] == 0:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        done.write_text(json.dumps(asdict(report), indent=1))
    return model, report


def train_pair(
    config,
    tokenizer,
    train_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    cfg: TopKTrainConfig | None = None,
    out_dir: str | Path = "topk-run",
) -> PairResult:
    """Train the dense twin and the TopK model (``out_dir/dense``, ``out_dir/topk``) alike.

        pair = train_pair(config, tok, train, heldout, TopKTrainConfig(steps=200), "runs/topk")
        print(pair.ppl_ratio, pair.topk.sparsity)
    """
    cfg = cfg or TopKTrainConfig()
    out = Path(out_dir)
    _, dense = train_one("dense", config, tokenizer, train_blocks, heldout_blocks, cfg,
                         out / "dense")
    _, topk = train_one("topk", config, tokenizer, train_blocks, heldout_blocks, cfg,
                        out / "topk")
    return PairResult(topk=topk, dense=dense, config=asdict(cfg))
