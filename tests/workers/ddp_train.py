"""Run under torchrun: `duallora.train.train` with a check after every optimizer step that every process holds the
same trainable weights. Writes the largest difference seen per step to the JSON file named by argv[2].

    torchrun --nproc_per_node 2 tests/workers/ddp_train.py run_config.json differences.json
"""

import json
import sys

import torch
import torch.distributed as dist

from duallora.train import RunConfig, train


def largest_difference_across_processes(model) -> float:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def main() -> None:
    cfg = RunConfig.from_dict(json.loads(open(sys.argv[1]).read()))
    differences = []
    train(cfg, overwrite=True, progress=False,
          on_step=lambda step, model: differences.append(largest_difference_across_processes(model)))
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"world_size": dist.get_world_size(), "differences": differences}, f)


if __name__ == "__main__":
    main()
