"""The supervised multi-task learner that :class:`mtrl_arch.loop.Run` drives: search -> derive -> retrain.

One command runs the whole pipeline of an architecture method on a benchmark adapter:

1. **Search** (methods that search, ``arch.search_steps`` > 0): ``arch.search_steps``
   calls of :func:`mtrl_arch.steps.search_step` on the method's search network, one
   training batch each (``train.limit_batches``, when set, caps the steps as it caps each
   retrain epoch's batches: a smoke run searches one short epoch). Methods with
   architecture parameters take their held-out batches from ``arch.val_fraction`` of
   the training split (CoNAL's 80/20), the rest trains the weights; methods without
   (Recon, LTB) use all of it. The weights use the run's optimiser at a constant rate.
2. **Derive** ``method.derive()`` -> a :class:`~mtrl_arch.tree.Tree`, written to
   ``arch.json`` / ``arch.txt``; the network is rebuilt as a
   :class:`~mtrl_arch.trunk.Trunk` with fresh weights (``arch.retrain=scratch``, the
   papers') or the search weights where names and shapes match (``continue``).
3. **Retrain** ``train.epochs`` epochs of :func:`mtrl_arch.steps.weight_step` on the whole
   training split, the learning rate multiplied by ``train.lr_gamma`` at each epoch in
   ``train.lr_milestones``. Non-searching methods (hps, stl, manual) start here.

Every weight step combines the per-task losses through
:class:`~mtrl_arch.update.GradientCombiner` (``weighting.*``, ``arch.conflict_noticed``).

Logs (``metrics.jsonl``; the x axis ``step`` counts optimisation steps, search included):
one line per epoch with ``train/loss/<task>`` (``search/loss/<task>`` while searching),
``lr``, ``time/*`` and ``conflict/*`` when gradient conflicts were measured; on
evaluation epochs (``eval.every_epochs`` and the last) ``eval/<metric>/<task>`` on the
test split and ``val/<metric>/<task>`` on the validation split, ``<metric>/mean`` over
tasks where every task has the metric, and ``eval/delta_m`` / ``val/delta_m`` (Delta_m %,
:func:`mtrl_arch.metrics.delta_m`) when a single-task baseline is configured
(``eval.baseline`` values or ``eval.baseline_run``, an STL run directory);
``params/trunk/<kind>`` once the architecture is fixed (``params/search/total`` for the
search network); ``time/wall_s`` (the loop's: training time summed over resumed sessions).

Checkpoints every ``train.checkpoint_every_epochs`` epochs (search epochs too), at the end of
the search and of the run, and on SIGINT/SIGTERM (the loop's rules, :mod:`mtrl_arch.loop`).
Batches are a pure function of (seed, epoch, position) and the RNG state is saved, so a resume
continues exactly where the checkpoint was taken (mid-epoch after a signal), the methods' step
schedules (``ArchMethod.apply_schedule``) included.

Data-parallel (``torchrun ... mtrl-arch train``; :mod:`mtrl_arch.distributed`): every rank
draws the same global batch and trains on its slice, gradients (per-task rows of shared
groups before they are combined) are averaged over ranks, evaluation runs on every rank,
and rank 0 alone reads checkpoints (broadcast to the others on resume) and writes the run
directory.

The loop's period is an epoch (a search epoch, or the search's last step); its progress
counts optimisation steps. The benchmark is an *adapter* (:class:`Adapter`, duck-typed; the
benchmarks live in :mod:`mtrl_arch.envs.supervised` and build.py composes the run, so agents/
never imports envs/).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from mtrl_arch import distributed
from mtrl_arch.checkpoint import NonFiniteError, rng_state, save_model_file, set_rng_state
from mtrl_arch.config import Config, ConfigError
from mtrl_arch.logger import read_metrics
from mtrl_arch.loop import Cadence
from mtrl_arch.metrics import delta_m
from mtrl_arch.safe_load import torch_load
from mtrl_arch.search import TrunkSpec, make_method
from mtrl_arch.steps import search_step, weight_parameters, weight_step
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import Trunk
from mtrl_arch.update import GradientCombiner
from mtrl_arch.weighting import make_weighting


class Data(Protocol):
    def __len__(self) -> int: ...
    def n_batches(self, batch_size: int, limit: int = 0) -> int: ...
    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, limit: int = 0,
                start: int = 0, num_workers: int = 0) -> Iterator[dict[str, Tensor]]: ...
    def holdout(self, fraction: float, seed: int) -> tuple["Data", "Data | None"]: ...


class Adapter(Protocol):
    """A benchmark: data, network description, per-task losses and metrics."""
    tasks: tuple[str, ...]
    spec: TrunkSpec                 # trunk stages + per-task heads
    shared_input: bool              # True: x [B, ...] feeds every task; False: x [T, B, ...]
    train: Data
    val: Data | None
    test: Data
    lower_is_better: dict[str, dict[str, bool]]  # task -> metric -> direction
    info: dict                      # provenance for the run record

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor | None]: ...  # (x, aux)
    def losses(self, outputs: Tensor, batch: dict) -> Tensor: ...       # [T]
    def metrics(self) -> Any: ...   # .update(outputs, batch); .compute() -> {task: {metric: value}}


RUN_FORMAT = "mtrl-arch/supervised-run"
MODEL_FORMAT = "mtrl-arch/supervised"


def check_loop_config(cfg: Config) -> None:
    """The loop's own config checks (one-line ConfigErrors)."""
    if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in cfg.train.lr_milestones):
        raise ConfigError(f"train.lr_milestones must be a list of positive epoch numbers; got {cfg.train.lr_milestones}")
    for k in ("limit_batches", "batch_size", "every_epochs"):
        if getattr(cfg.eval, k, 0) < 0:
            raise ConfigError(f"eval.{k} must be >= 0; got {getattr(cfg.eval, k)}")
    b = cfg.eval.baseline
    if not all(isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())
               for v in b.values()):
        raise ConfigError("eval.baseline must map task -> {metric: number}, e.g. {top_left: {accuracy: 0.97}}")


def load_baseline(cfg: Config) -> dict[str, dict[str, dict[str, float]]]:
    """Single-task reference results per split: {'test': {task: {metric: v}}, 'val': ...}."""
    out: dict[str, dict] = {}
    if cfg.eval.baseline_run:
        path = Path(cfg.eval.baseline_run)
        recs = [r for r in read_metrics(path) if any(k.startswith("eval/") for k in r)]
        if not recs:
            raise ConfigError(f"eval.baseline_run={path} has no evaluation in metrics.jsonl; give a finished run directory")
        for prefix, split in (("eval/", "test"), ("val/", "val")):
            res: dict[str, dict[str, float]] = {}
            for k, v in recs[-1].items():
                parts = k.split("/")
                if k.startswith(prefix) and len(parts) == 3 and parts[2] != "mean" and isinstance(v, (int, float)):
                    res.setdefault(parts[2], {})[parts[1]] = float(v)
            if res:
                out[split] = res
    if cfg.eval.baseline:
        out["test"] = {t: {m: float(v) for m, v in ms.items()} for t, ms in cfg.eval.baseline.items()}
    return out


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


class _Forward:
    """The network's forward, through ``torch.compile`` when asked; falls back to eager on failure."""

    def __init__(self, net: nn.Module, compile: bool, mode: str = "default"):
        self.net, self.compiled = net, None
        if compile:
            try:
                self.compiled = torch.compile(net, mode=mode)
            except Exception as e:  # noqa: BLE001
                _warn(f"torch.compile unavailable ({type(e).__name__}); running eagerly")

    def __call__(self, *args, **kw) -> Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kw)
            except Exception as e:  # noqa: BLE001 - a compile failure must not end the run
                _warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); running eagerly")
                self.compiled = None
        return self.net(*args, **kw)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


class SupervisedRun:
    """The learner (:mod:`mtrl_arch.loop`'s protocol): one run's networks, optimiser, counters and data streams."""
    unit = "step"
    eval_everywhere = True  # data-parallel: every rank evaluates every batch

    def __init__(self, cfg: Config, adapter: Adapter, device: torch.device,
                 on_arch: Callable[[Tree], None] | None = None):
        self.cfg, self.adapter, self.device, self.on_arch = cfg, adapter, device, on_arch
        self.tasks = tuple(adapter.tasks)
        T = len(self.tasks)
        self.method = make_method(cfg.arch.method, adapter.spec, cfg.arch.options, cfg.seed, derive=cfg.arch)
        self.searching = self.method.searches and cfg.arch.search_steps > 0
        # train.limit_batches (smoke runs) caps the search's steps as it caps each retrain epoch's batches
        lim = cfg.train.limit_batches
        self.search_steps = min(cfg.arch.search_steps, lim) if lim else cfg.arch.search_steps
        self.combiner = GradientCombiner(make_weighting(cfg.weighting.method, n_tasks=T, **cfg.weighting.options),
                                         cfg.arch.conflict_noticed, cfg.arch.cn_variant, cfg.arch.track_conflicts_every,
                                         cn_fraction=cfg.arch.cn_fraction)
        self.combiner.weighting.to(device)
        amp = cfg.train.amp and device.type == "cuda"
        if cfg.train.amp and not amp:
            _warn(f"train.amp is for CUDA devices; running in float32 on {device.type}")
        self._amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        self.baseline = load_baseline(cfg)
        self.step = 0              # optimisation steps, search included (the log's x axis)
        self.search_done = 0       # search steps done
        self.search_epoch = 0
        self.epoch = 0             # retrain epochs done
        self.pos = 0               # batches done in the current epoch
        self.val_pos = 0           # held-out batches drawn in the current search epoch
        self.last_eval: dict[str, float] = {}
        self.tree: Tree | None = None
        self._it = self._val = None  # the open epoch's batch streams (None: start them at pos / val_pos)
        self._build(search=self.searching)
        self.search_train, self.search_val = adapter.train, None
        if self.searching and self.method.arch_parameters():
            self.search_train, self.search_val = adapter.train.holdout(cfg.arch.val_fraction, cfg.seed)
            if self.search_val is None:
                _warn(f"arch.val_fraction={cfg.arch.val_fraction} of {len(adapter.train)} training examples holds "
                      "none out; the architecture steps use the training data")
                self.search_train, self.search_val = adapter.train, adapter.train

    # ---- networks ----------------------------------------------------------------------------------
    def _build(self, search: bool, tree: Tree | None = None) -> None:
        if search:
            net = self.method.build()
        else:
            self.tree = tree or self.method.derive()
            net = Trunk(self.tree, self.adapter.spec.stages, self.adapter.spec.heads)
        self.net = net.to(self.device)
        m = self.method
        if search and m.arch_optimizer is not None:  # the net may have moved device: same tensors, fresh optimiser
            d = m.arch_optimizer.defaults
            m.make_arch_optimizer(d["lr"], d["weight_decay"], d["betas"])
        self.opt = make_optimizer(self.cfg, weight_parameters(self.net) + list(self.combiner.weighting.parameters()))
        if distributed.active():  # every rank starts from rank 0's weights; the combiner averages these grads
            distributed.broadcast_module(self.net)
            distributed.broadcast_(list(self.combiner.weighting.parameters()))
            setattr(self.opt, distributed.SYNCED, True)
        self.sched = None if search else torch.optim.lr_scheduler.MultiStepLR(
            self.opt, list(self.cfg.train.lr_milestones), self.cfg.train.lr_gamma)
        self.fwd = _Forward(self.net, self.cfg.train.compile, self.cfg.train.compile_mode)

    @property
    def model(self) -> nn.Module:
        return self.net

    def finish_search(self) -> None:
        """Derive the tree, rebuild the network from it, record it."""
        old = self.net.state_dict()
        self.searching = False
        tree = self.method.derive()
        if distributed.active():  # rank 0's tree everywhere (the ranks' searches are identical; this makes sure)
            tree = Tree.from_dict(distributed.broadcast_object(tree.to_dict()))
        self._build(False, tree)
        if self.cfg.arch.retrain == "continue":
            own = self.net.state_dict()
            self.net.load_state_dict({k: (old[k] if k in old and old[k].shape == v.shape else v) for k, v in own.items()})
        if self.on_arch is not None:
            self.on_arch(self.tree)

    def param_counts(self) -> dict[str, int]:
        if isinstance(self.net, Trunk):
            return {f"params/trunk/{k}": v for k, v in self.net.param_counts().items()}
        return {"params/search/total": sum(p.numel() for p in weight_parameters(self.net))}

    # ---- steps --------------------------------------------------------------------------------------
    def _to(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _shard(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A training batch on the device; data-parallel: this rank's slice of the global batch."""
        return self._to(distributed.shard_batch(batch, 0 if self.adapter.shared_input else 1))

    def _losses(self, net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, aux = self.adapter.inputs(batch)
        with self._amp():
            out = self.fwd(x, shared_input=self.adapter.shared_input, aux=aux)
        return self.adapter.losses(out, batch)

    def _val_batches(self, bs: int) -> Iterator[dict[str, Tensor]]:
        """Endless held-out batches for architecture steps, resumable at ``val_pos``."""
        nb = self.search_val.n_batches(bs)
        while True:
            k, start = divmod(self.val_pos, nb)
            for b in self.search_val.batches(bs, True, self.cfg.seed + 1, self.search_epoch * 100_003 + k, 0, start,
                                             self.cfg.data.num_workers):
                self.val_pos += 1
                yield self._shard(b)

    # ---- the loop's protocol ------------------------------------------------------------------------------
    def _n(self) -> int:
        """Batches in the current epoch."""
        bs, lim = self.cfg.train.batch_size, self.cfg.train.limit_batches
        return (self.search_train if self.searching else self.adapter.train).n_batches(bs, lim)

    def progress(self) -> int:
        return self.step

    def total(self) -> int:
        n = self.adapter.train.n_batches(self.cfg.train.batch_size, self.cfg.train.limit_batches)
        return self.step + max(0, self.search_steps - self.search_done if self.searching else 0) \
            + max(0, self.cfg.train.epochs - self.epoch) * n - self.pos

    def finished(self) -> bool:
        E = self.cfg.train.epochs
        return not self.searching and (self.epoch >= E or self.epoch + 1 == E and self.pos >= self._n())

    def periods(self) -> int:
        return (self.search_epoch if self.searching else self.epoch) + 1

    def period_pending(self) -> bool:
        if self.searching:
            return self.pos >= self._n() or self.search_done >= self.search_steps
        return self.epoch < self.cfg.train.epochs and self.pos >= self._n()

    def search_over(self) -> bool:
        return self.search_done >= self.search_steps

    def cadence(self) -> Cadence:
        every = self.cfg.train.checkpoint_every_epochs
        if self.searching:
            return Cadence(log=1, checkpoint=every)
        return Cadence(log=1, eval=self.cfg.eval.every_epochs, checkpoint=every, eval_at_end=True)

    def begin(self, budget: int | None = None) -> None:
        self.net.train()

    def train_step(self, stop: Callable | None = None) -> list[dict]:
        """One batch: a search step while searching, else a weight step; its per-task losses (for the loop's window)."""
        cfg, bs, lim = self.cfg, self.cfg.train.batch_size, self.cfg.train.limit_batches
        if self.searching:
            if self._it is None:
                self._it = iter(self.search_train.batches(bs, True, cfg.seed, self.search_epoch, lim, self.pos,
                                                          cfg.data.num_workers))
                self._val = self._val_batches(bs) if self.search_val is not None else None
            batch = next(self._it)
            vb = next(self._val) if self._val is not None and self.method.phase(self.search_done).arch else None
            out = search_step(self.method, self.net, self._shard(batch), vb, self._losses, self.combiner, self.opt,
                              self.search_done, cfg.train.grad_clip)
            losses = out.get("train_losses")
            self.search_done += 1
        else:
            if self._it is None:
                self._it = iter(self.adapter.train.batches(bs, True, cfg.seed + 2, self.epoch, lim, self.pos,
                                                           cfg.data.num_workers))
            losses = weight_step(self.net, self._shard(next(self._it)), self._losses, self.combiner, self.opt,
                                 self.step, cfg.train.grad_clip)
        self.step += 1
        self.pos += 1
        return [] if losses is None else [{"loss": losses.detach()}]

    def end_period(self, evaluation: dict, means: dict) -> dict[str, Any]:
        """The epoch's line; a retrain epoch also steps the learning rate (after its evaluation, which a stop may
        abandon: the checkpoint then holds the state after the epoch's last step)."""
        self._it = self._val = None
        phase = "search" if self.searching else "train"
        mean = means.get("loss", torch.zeros(len(self.tasks), dtype=torch.float64))  # cadence.log=1: means every epoch
        self.combiner.weighting.end_epoch(mean.float())  # DWA weighs tasks by the epochs' mean losses
        vals = mean.tolist()
        rec: dict[str, Any] = {f"{phase}/loss/{t}": v for t, v in zip(self.tasks, vals)}
        rec[f"{phase}/loss/mean"] = sum(vals) / len(vals)
        rec["phase"] = phase
        if self.searching:
            self.search_epoch += 1
            rec["epoch"], rec["lr"] = self.search_epoch, self.opt.param_groups[0]["lr"]
            rec.update(self.method.arch_values())
        else:
            self.epoch += 1
            rec["epoch"], rec["lr"] = self.epoch, self.opt.param_groups[0]["lr"]
            # a run resumed after a stop in the evaluation ends the epoch before this process's first optimiser
            # step, which torch's schedulers warn of; the schedule comes from the checkpoint, nothing is skipped
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                self.sched.step()
        if self.combiner.stats.steps:
            rec.update(self.combiner.stats.summary())
        self.pos = self.val_pos = 0
        return rec

    def finite(self, window: Any) -> None:
        """NonFiniteError (CLI exit 3) when the epoch's mean loss of a task is not finite (over every rank's)."""
        mean = window.means().get("loss")
        if mean is not None and not torch.isfinite(mean).all():
            raise NonFiniteError(f"non-finite {'search' if self.searching else 'train'} loss at step {self.step} "
                                 f"({mean.tolist()}); the last good checkpoint is kept")

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, stop: Callable[[], None] | None = None, final: bool = False) -> dict[str, float]:
        """Metrics on the validation and test splits; ``stop()`` before each batch (the loop's: a stop request
        abandons the evaluation with :class:`~mtrl_arch.checkpoint.StopRequested`)."""
        cfg, a = self.cfg, self.adapter
        bs = cfg.eval.batch_size or cfg.train.batch_size
        was = self.net.training
        distributed.average_buffers(self.net)  # BatchNorm running statistics: one set for every rank
        self.net.eval()
        out: dict[str, float] = {}
        try:
            for split, prefix in (("val", "val"), ("test", "eval")):
                data = getattr(a, split)
                if data is None:
                    continue
                acc = a.metrics()
                for batch in data.batches(bs, False, 0, 0, cfg.eval.limit_batches, 0, cfg.data.num_workers):
                    if stop is not None:  # data-parallel: every rank evaluates every batch, so they agree here
                        stop()
                    batch = self._to(batch)
                    x, aux = a.inputs(batch)
                    with self._amp():
                        y = self.fwd(x, shared_input=a.shared_input, aux=aux)
                    acc.update(y.float(), batch)
                res = acc.compute()
                for t, ms in res.items():
                    out.update({f"{prefix}/{m}/{t}": v for m, v in ms.items()})
                if len(res) > 1:
                    common = set.intersection(*(set(ms) for ms in res.values()))
                    out.update({f"{prefix}/{m}/mean": sum(ms[m] for ms in res.values()) / len(res) for m in sorted(common)})
                base = self.baseline.get(split)
                if base:
                    mine = {t: {m: v for m, v in ms.items() if m in base.get(t, {})} for t, ms in res.items() if t in base}
                    mine = {t: ms for t, ms in mine.items() if ms}
                    if mine:
                        out[f"{prefix}/delta_m"] = delta_m(mine, base, a.lower_is_better)
        finally:
            self.net.train(was)
        self.last_eval = out
        return out

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Called on every rank (BatchNorm statistics are averaged over them first)."""
        distributed.average_buffers(self.net)
        return {"format": RUN_FORMAT, "version": 1, "searching": self.searching,
                "tree": None if self.tree is None else self.tree.to_dict(),
                "step": self.step, "search_done": self.search_done, "search_epoch": self.search_epoch,
                "epoch": self.epoch, "pos": self.pos, "val_pos": self.val_pos, "last_eval": dict(self.last_eval),
                "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "sched": None if self.sched is None else self.sched.state_dict(),
                "method": self.method.state_dict() if self.searching else None,
                "combiner": self.combiner.state_dict(), "rng": rng_state()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("format") != RUN_FORMAT:
            raise ConfigError("the checkpoint is not a supervised run's; resume it with the command that made it")
        if not d["searching"] and (self.searching or self.tree is None or self.tree.to_dict() != d["tree"]):
            self.searching = False
            self._build(False, Tree.from_dict(d["tree"]))
        self.net.load_state_dict(d["net"])
        self.opt.load_state_dict(d["opt"])
        if self.sched is not None and d["sched"] is not None:
            self.sched.load_state_dict(d["sched"])
        if self.searching and d["method"] is not None:
            self.method.load_state_dict(d["method"])
        self.combiner.load_state_dict(d["combiner"])
        if self.searching:  # methods' schedules count search steps
            self.method.apply_schedule(d["search_done"])
        for k in ("step", "search_done", "search_epoch", "epoch", "pos", "val_pos"):
            setattr(self, k, d[k])
        self.last_eval = dict(d["last_eval"])
        self._it = self._val = None
        set_rng_state(d["rng"])

    def save_model(self, path: Path) -> None:
        save_model_file({"format": MODEL_FORMAT, "version": 1, "config": self.cfg.to_dict(), "tasks": list(self.tasks),
                         "tree": self.tree.to_dict(), "net": self.net.state_dict()}, path)

    def load_model(self, path: Path, trust_file: bool = False) -> None:
        """The final model :meth:`save_model` wrote; one holding more than tensors and plain data is refused
        (:class:`~mtrl_arch.safe_load.UntrustedFileError`) unless ``trust_file``."""
        d = torch_load(path, path, trust_file=trust_file)
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{path} is not a supervised model saved by mtrl-arch")
        self.searching = False
        self._build(False, Tree.from_dict(d["tree"]))
        self.net.load_state_dict(d["net"])
