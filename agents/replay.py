"""Task-balanced replay on the training device.

All tasks step together (one sub-environment per task), so the buffer is one ring of
``capacity`` slots per task: tensors ``[T, capacity, ...]``. A batch holds the same
number of transitions from every task, sampled in torch on the device (no host copies).

For architecture search a fixed share of slots is held out: with ``val_every = m``,
slots ``0, m, 2m, ...`` are validation and the rest training, so the split never
changes as the ring wraps.
"""
from __future__ import annotations

import torch
from torch import Tensor


class TaskBalancedReplay:
    FIELDS = ("obs", "action", "reward", "next_obs", "done")

    def __init__(self, n_tasks: int, capacity: int, obs_dim: int, action_dim: int, device: torch.device | str = "cpu",
                 val_fraction: float = 0.0):
        self.val_every = round(1.0 / val_fraction) if val_fraction > 0 else 0
        if self.val_every:
            capacity = max(self.val_every, capacity - capacity % self.val_every)
        self.T, self.capacity, self.device = n_tasks, capacity, torch.device(device)
        T, d = n_tasks, self.device
        # one row of every field side by side in a single tensor: a batch is one gather, and
        # obs and action are adjacent, so the critic's input [obs, action] is a slice
        widths = {"obs": obs_dim, "action": action_dim, "reward": 1, "next_obs": obs_dim, "done": 1}
        self._cols: dict[str, slice] = {}
        c = 0
        for name in self.FIELDS:
            self._cols[name] = slice(c, c + widths[name])
            c += widths[name]
        self.storage = torch.zeros(T, capacity, c, device=d)
        for name in self.FIELDS:  # views into storage, by field
            v = self.storage[..., self._cols[name]]
            setattr(self, name, v.squeeze(-1) if widths[name] == 1 and name in ("reward", "done") else v)
        self.pos = 0
        self.size = 0
        self._rows = torch.arange(T, device=d)[:, None]

    def add(self, obs, action, reward, next_obs, done) -> None:
        """One transition per task: arrays with leading dim T (numpy or torch)."""
        p = self.pos
        row = torch.cat([torch.as_tensor(v, dtype=torch.float32).reshape(self.T, -1)
                         for v in (obs, action, reward, next_obs, done)], 1)
        self.storage[:, p] = row.to(self.device, non_blocking=True)  # one host-to-device copy per step
        self.pos = (p + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def _slots(self, n: int, split: str, g: torch.Generator | None) -> Tensor:
        m = self.val_every
        if not m or split == "all":
            return torch.randint(0, self.size, (self.T, n), device=self.device, generator=g)
        n_val = -(-self.size // m)  # slots 0, m, 2m, ... below size
        if split == "val":
            return torch.randint(0, n_val, (self.T, n), device=self.device, generator=g) * m
        u = torch.randint(0, max(self.size - n_val, 1), (self.T, n), device=self.device, generator=g)
        return (u // (m - 1)) * m + 1 + u % (m - 1)

    def sample(self, n_per_task: int, split: str = "all", generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``n_per_task`` transitions from every task: tensors ``[T, n, ...]``.

        ``split``: ``all``, ``train`` (held-out slots excluded) or ``val`` (held-out only).
        The fields are views into one gathered tensor; ``obs_action`` is ``[obs, action]``.
        """
        idx = self._slots(n_per_task, split, generator)
        rows = self.storage[self._rows, idx]  # [T, n, width]: one gather for every field
        out = {name: rows[..., self._cols[name]] for name in self.FIELDS}
        out["reward"], out["done"] = out["reward"].squeeze(-1), out["done"].squeeze(-1)
        out["obs_action"] = rows[..., self._cols["obs"].start:self._cols["action"].stop]
        return out

    def state_dict(self) -> dict:
        n = self.size
        return {"pos": self.pos, "size": n, "capacity": self.capacity, "val_every": self.val_every,
                **{f: getattr(self, f)[:, :n].cpu().clone() for f in self.FIELDS}}

    def load_state_dict(self, d: dict) -> None:
        if d["capacity"] != self.capacity or d["val_every"] != self.val_every:
            raise ValueError(f"replay layout differs (capacity {d['capacity']} vs {self.capacity}); resume with the same agent.buffer_size")
        n = d["size"]
        for f in self.FIELDS:
            getattr(self, f)[:, :n] = d[f].to(self.device)
        self.pos, self.size = d["pos"], n
