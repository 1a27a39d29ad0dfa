"""Check that DDP training matches single-process training (used by the tests; handy on a new
cluster too):

    torchrun --standalone --nproc_per_node 2 -m memlens.organisms.ddp_check out.json
    python -m memlens.organisms.ddp_check out1.json          # the 1-process reference

Trains a 2-layer GPT-2 on seeded counting sequences for a few steps with global batch 8 and writes
rank 0's loss history and a parameter checksum to the JSON file.
"""

from __future__ import annotations

import json
import sys


def main(out: str, steps: int = 6) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from memlens.trainer import TrainConfig, dist_info, train

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                       n_positions=16, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    # Learnable toy data: counting sequences (t + offset) mod 64 from seeded offsets.
    offsets = torch.randint(0, 64, (64, 1), generator=torch.Generator().manual_seed(1))
    data = (offsets + torch.arange(16)) % 64
    cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1,
                      progress=False, num_threads=1)
    result = train(model, data, cfg)
    rank, world, _ = dist_info()
    if rank == 0:
        checksum = sum(float(p.double().sum()) for p in model.parameters())
        with open(out, "w") as f:
            json.dump({"world_size": world, "history": result.history,
                       "checksum": checksum}, f)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
