"""Run under torchrun: `duallora.app.train.train` with a check after every optimizer step that every process holds the
same trainable weights. Writes the largest difference seen per step to the JSON file named by argv[2], and the
gradients the optimizer was handed at every step (after DDP averaged them) to the file named by argv[3].

    torchrun --nproc_per_node 2 tests/workers/ddp_train.py run_config.json differences.json gradients.pt
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from duallora.app.run_config import RunConfig
from duallora.app.train import train


def record_gradients(steps: list) -> object:
    """Keep, before every optimizer step, a copy of each gradient it is about to apply (in parameter order)."""
    def hook(optimizer, args, kwargs):
        steps.append([p.grad.detach().clone() if p.grad is not None else None
                      for group in optimizer.param_groups for p in group["params"]])
    return register_optimizer_step_pre_hook(hook)


def largest_difference_across_processes(model) -> float:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def main() -> None:
    cfg = RunConfig.from_dict(json.loads(open(sys.argv[1]).read()))
    differences, gradients = [], []
    handle = record_gradients(gradients)
    train(cfg, overwrite=True, progress=False,
          on_step=lambda step, model: differences.append(largest_difference_across_processes(model)))
    handle.remove()
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"world_size": dist.get_world_size(), "differences": differences}, f)
        torch.save(gradients, sys.argv[3])


if __name__ == "__main__":
    main()
