"""Run by tests/test_ddp.py: trains one step of an rnnext model under DistributedDataParallel
(gloo, two processes on this machine) and, in rank 0, compares every gradient with a
single-process step over the whole batch. Prints "DDP OK max_diff=..." on success."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import rnnext


def make_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "lstm": rnnext.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True),
        "gru": rnnext.GRU(16, 6, batch_first=True),
    }).double()


def forward(model, x):
    y, _ = model["lstm"](x)
    y, h = model["gru"](y)
    return y.square().mean() + h.sum()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 7, 5, generator=g, dtype=torch.float64)


class Wrapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_model()

    def forward(self, x):
        return forward(self.inner, x)


def main(tmp):
    init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
    mp.spawn(run_rank, args=(2, init_file, out_file), nprocs=2, join=True)
    ddp_grads = torch.load(out_file)
    single = Wrapped()
    x = data()
    # Each rank's loss is (mean over its half) + h.sum() over its half; DDP averages the two
    # ranks' gradients, i.e. the gradient of (mean over all) + h.sum() / 2 over all rows.
    halves = x.chunk(2)
    total = sum(single(h) for h in halves) / 2
    total.backward()
    worst = 0.0
    for name, p in single.named_parameters():
        worst = max(worst, (p.grad - ddp_grads[name]).abs().max().item())
    print(f"DDP OK max_diff={worst:.3e}" if worst < 1e-12 else f"DDP MISMATCH max_diff={worst:.3e}")


def run_rank(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = Wrapped()
    ddp = DistributedDataParallel(model)
    shard = data().chunk(world)[rank]
    ddp(shard).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
