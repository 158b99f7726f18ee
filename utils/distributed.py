"""Runs under torchrun: one process per device, with torch.distributed (NCCL on GPUs, gloo on the CPU).

    torchrun --nproc_per_node 4 main_LoDM.py --dataset TinyImageNet --ipc 10
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 main_DM.py ...

The processes form teams: experiment e belongs to team e % num_teams, num_teams = min(processes,
--num_exp), and process r to team r % num_teams. The members of a team share its experiments: they split
the evaluation networks (and, in DM, the classes: distribution.py's class blocks) and gather the results.
Experiments, evaluation networks and class blocks draw from their own seeds, so a run gives the same
numbers on any number of processes. Without torchrun there is one team of one process and nothing here
communicates.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import UserError


def launched():
    """Started by torchrun with more than one process."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def rank():
    """This process's rank (torchrun's RANK before the process group exists; 0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get('RANK', '0'))


def init(device):
    """Join torchrun's process group once: NCCL for CUDA devices, gloo for the CPU."""
    if not launched() or dist.is_initialized():
        return
    if torch.device(device).type == 'cuda':
        torch.cuda.set_device(device)
        dist.init_process_group('nccl')
    else:
        dist.init_process_group('gloo')


def local_device(device):
    """Under torchrun, CUDA means this process's GPU, cuda:LOCAL_RANK; a UserError if there are fewer GPUs
    than processes on this node."""
    if not launched() or not device.startswith('cuda'):
        return device
    local, per_node = int(os.environ['LOCAL_RANK']), int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    if torch.cuda.device_count() < per_node:
        raise UserError(f'torchrun started {per_node} processes on this node but only '
                        f'{torch.cuda.device_count()} GPU(s) are visible: use --nproc_per_node '
                        f'{torch.cuda.device_count()} or fewer (or --device cpu).')
    return f'cuda:{local}'


def split(items, member, size):
    """The items of member `member` of `size`: every size-th, from the member-th."""
    return items[member::size]


@dataclass
class Team:
    """This process's team: `member` of `size` processes sharing the experiments e with e % count == index."""
    index: int = 0
    count: int = 1
    member: int = 0
    size: int = 1
    group: object = None

    @property
    def leader(self):
        return self.member == 0

    def experiments(self, num_exp):
        return [e for e in range(num_exp) if e % self.count == self.index]

    def gather(self, obj):
        """obj of every member, in member order (the object itself without teammates)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def total(self, value):
        """The sum of a float over the members."""
        if self.size == 1:
            return value
        return sum(self.gather(value))

    @torch.no_grad()
    def merge_rows(self, synset, classes):
        """Every member condensed its own `classes` of a shared synthetic set: give all members every row
        (members' rows are summed with zeros elsewhere, so each value arrives exactly)."""
        if self.size == 1:
            return
        for p in synset.parameters():
            mine = torch.zeros_like(p)
            for rows in synset.rows(classes):
                mine[rows] = p[rows]
            dist.all_reduce(mine, group=self.group)
            p.copy_(mine)


def make_team(num_exp):
    """This process's team (collective: every process calls it with the same num_exp)."""
    if not dist.is_initialized():
        return Team()
    world, me = dist.get_world_size(), dist.get_rank()
    count = min(world, num_exp)
    groups = [dist.new_group([r for r in range(world) if r % count == t]) for t in range(count)]
    members = [r for r in range(world) if r % count == me % count]
    return Team(me % count, count, members.index(me), len(members), groups[me % count])


def gather_to_root(obj):
    """obj of every process, in rank order, on rank 0 (None elsewhere); obj itself without torchrun."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out if dist.get_rank() == 0 else None


def broadcast(obj):
    """Rank 0's obj on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()
