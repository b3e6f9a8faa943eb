"""Task-balanced replay on the training device.

All tasks step together (one sub-environment per task), so the buffer is one ring of
``capacity`` slots per task: tensors ``[T, capacity, ...]``. A batch holds the same
number of transitions from every task, sampled in torch on the device (no host copies).

For architecture search a fixed share of *whole episodes* is held out. Every task's
episodes have ``episode_len`` steps and start together, and slot ``k`` holds vector step
``k mod capacity``, so episode ``j`` fills the block of slots ``[j E, (j+1) E)`` (mod the
capacity). With ``val_every = m``, every m-th block (``1, m+1, 2m+1, ...``) is
validation and the rest training; the capacity is a multiple of ``m E``, so a block keeps
its role as the ring wraps and no validation transition sits inside a training episode
(held-out slots between training steps of the same episodes would make the validation TD
loss a training loss). Training data exists from the first step; the first validation
episode is the second: until it starts a ``val`` sample is empty (:meth:`n_val` is 0) and
callers skip their architecture step.
"""
from __future__ import annotations

import torch
from torch import Tensor


class TaskBalancedReplay:
    FIELDS = ("obs", "action", "reward", "next_obs", "done")

    def __init__(self, n_tasks: int, capacity: int, obs_dim: int, action_dim: int, device: torch.device | str = "cpu",
                 val_fraction: float = 0.0, episode_len: int = 1):
        # at most every second episode held out: training data must exist from the first step
        self.val_every = max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0
        self.episode_len = max(1, int(episode_len))
        if self.val_every:
            unit = self.val_every * self.episode_len
            capacity = max(unit, capacity - capacity % unit)
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
        self._row_start = torch.arange(T, device=d)[:, None] * capacity  # task t's first row of storage.view(-1, width)
        if self.val_every:  # every slot of each split, ascending: a split's slots below ``size`` are a prefix
            is_val = (torch.arange(capacity) // self.episode_len) % self.val_every == 1
            # counted on the host (no device sync per sample), gathered on the device
            self._split_host = {"val": torch.nonzero(is_val).squeeze(1), "train": torch.nonzero(~is_val).squeeze(1)}
            self._split_slots = {k: v.to(d) for k, v in self._split_host.items()}

    def add(self, obs, action, reward, next_obs, done) -> None:
        """One transition per task: arrays with leading dim T (numpy or torch)."""
        p = self.pos
        row = torch.cat([torch.as_tensor(v, dtype=torch.float32).reshape(self.T, -1)
                         for v in (obs, action, reward, next_obs, done)], 1)
        self.storage[:, p] = row.to(self.device, non_blocking=True)  # one host-to-device copy per step
        self.pos = (p + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def n_val(self) -> int:
        """Held-out slots filled so far (per task)."""
        return self._filled("val") if self.val_every else 0

    def _filled(self, split: str) -> int:
        return int(torch.searchsorted(self._split_host[split], self.size))

    def _slots(self, n: int, split: str, g: torch.Generator | None) -> Tensor:
        if not self.val_every or split == "all":
            return torch.randint(0, self.size, (self.T, n), device=self.device, generator=g)
        filled = self._filled(split)
        if filled == 0:
            raise ValueError(f"no {split} transitions in the replay yet ({self.size} steps per task, held-out episodes "
                             f"every {self.val_every} of {self.episode_len} steps)")
        return self._split_slots[split][torch.randint(0, filled, (self.T, n), device=self.device, generator=g)]

    def sample(self, n_per_task: int, split: str = "all", generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``n_per_task`` transitions from every task: tensors ``[T, n, ...]``.

        ``split``: ``all``, ``train`` (held-out slots excluded) or ``val`` (held-out only).
        The fields are views into one gathered tensor; ``obs_action`` is ``[obs, action]``.
        """
        idx = self._slots(n_per_task, split, generator)
        # [T, n, width]: one gather for every field; index_select over flat rows is ~4x faster on CPU than
        # the advanced indexing storage[arange(T)[:, None], idx] (same rows)
        flat = self.storage.view(-1, self.storage.shape[-1])
        rows = flat.index_select(0, (idx + self._row_start).view(-1)).view(self.T, n_per_task, -1)
        out = {name: rows[..., self._cols[name]] for name in self.FIELDS}
        out["reward"], out["done"] = out["reward"].squeeze(-1), out["done"].squeeze(-1)
        out["obs_action"] = rows[..., self._cols["obs"].start:self._cols["action"].stop]
        return out

    def state_dict(self) -> dict:
        n = self.size
        return {"pos": self.pos, "size": n, "capacity": self.capacity, "val_every": self.val_every,
                "episode_len": self.episode_len,
                **{f: getattr(self, f)[:, :n].cpu().clone() for f in self.FIELDS}}

    def load_state_dict(self, d: dict) -> None:
        if (d["capacity"], d["val_every"], d.get("episode_len", 1)) != (self.capacity, self.val_every, self.episode_len):
            raise ValueError(f"replay layout differs (capacity {d['capacity']} vs {self.capacity}); resume with the same agent.buffer_size")
        n = d["size"]
        for f in self.FIELDS:
            getattr(self, f)[:, :n] = d[f].to(self.device)
        self.pos, self.size = d["pos"], n
