"""Run by tests/test_lm.py under `torchrun --nproc_per_node=N`: calls train_muon.train once per config in
the JSON file argv[1], in order, so one launch of the ranks covers several DDP / FSDP runs. The process
group is made here, once: train() uses a group it finds (FSDP2 hangs on a group made after another
was destroyed in the same process)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch.distributed as dist  # noqa: E402

import train_muon  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    with open(sys.argv[1]) as f:
        for cfg in json.load(f):
            train_muon.train(cfg)
    dist.barrier()  # no rank tears its group down while the other still talks to it
    dist.destroy_process_group()
