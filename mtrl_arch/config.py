"""Run configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

Everything is checked before anything heavy starts; a bad key, type or value raises
:class:`ConfigError` with one line naming it and what is valid (the CLI turns it into
exit code 2). Options blocks (``arch.options``, ``weighting.options``, ``data.options``,
``model.options``) are checked against their method's or benchmark's options class by the same
rules (:mod:`mtrl_arch.options`).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError  # noqa: F401 (re-exported: the public place to import it from)
from .options import coerce, parse_options, unknown_key


class YamlLoader(yaml.SafeLoader):
    """YAML with every float literal Python accepts.

    YAML 1.1 (PyYAML) reads ``3e-4``, ``1e20`` and ``1.0e20`` as strings (it wants a dot and
    a signed exponent); every RL user types ``train.lr=3e-4``, so those are floats here.
    """


YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                  |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with :class:`YamlLoader`'s floats: the one YAML reader of configs and overrides."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class ArchConfig:
    method: str = "hps"               # hps | stl | manual | random | conal | conal_pro | ltb | adashare | recon
    search_steps: int = 0             # architecture-search steps before deriving (RL: vector env steps)
    retrain: Literal["scratch", "continue"] = "scratch"  # after deriving: retrain from scratch (paper) or keep the searched weights
    conflict_noticed: bool = False    # withhold a shared group's update on steps where task gradients conflict there
    cn_variant: Literal["layer", "branch"] = "layer"
    cn_fraction: float = 0.0          # withhold a group when more than this share of its task pairs conflict (0: any pair, the paper)
    val_fraction: float = 0.2         # share of data (RL: of the replay) held out for architecture steps
    track_conflicts_every: int = 0    # measure gradient conflicts every N updates even when nothing needs them (0: never)
    options: dict = field(default_factory=dict)  # method-specific, see the method's Options class
    # how the final tree is read off the architecture weights (mtrl_arch/search/derive.py; each method's
    # docstring says how it applies them): argmax (the papers' rule) or margin (share unless the more
    # private choice wins by derive_margin in probability)
    derive: Literal["argmax", "margin"] = "argmax"
    derive_margin: float = 0.1
    # > 0: the best tree by the search's scores whose trunk (shared + subgroup + specific modules, heads
    # not counted) has at most this many parameters, per network (RL: actor and critic each); needs derive=argmax
    max_params: int = 0
    min_params: int = 0               # > 0: a lower bound on the trunk (arch.method=random draws within [min_params, max_params])
    # RL: one network's own values of the fields in PER_NETWORK (e.g. arch.critic.method=stl, arch.actor.max_params=N);
    # unset ones inherit arch.* (options only when the method is arch.method's); resolved, both networks show in full
    actor: dict = field(default_factory=dict)   # RL actor's overrides of PER_NETWORK fields ({}: arch.* as is)
    critic: dict = field(default_factory=dict)  # RL critic's overrides (both members of the twin critic)


# what arch.actor / arch.critic may set (search scheduling, retraining and the conflict settings stay shared)
PER_NETWORK = ("method", "options", "derive", "derive_margin", "max_params", "min_params")
NETWORKS = ("actor", "critic")


def network_arch(arch: ArchConfig, network: str) -> ArchConfig:
    """The arch settings the RL ``network`` (actor or critic) uses: ``arch.*`` with ``arch.<network>.*`` over it."""
    own = getattr(arch, network)
    for k in own:
        if k not in PER_NETWORK:
            raise unknown_key(f"arch.{network}", str(k), PER_NETWORK)
    method = coerce(own.get("method", arch.method), str, f"arch.{network}.method")
    options = coerce(own.get("options"), dict, f"arch.{network}.options")
    values = {k: coerce(v, _hint(ArchConfig, k), f"arch.{network}.{k}") for k, v in own.items() if k not in ("method", "options")}
    return dataclasses.replace(arch, method=method, options={**(arch.options if method == arch.method else {}), **options},
                               actor={}, critic={}, **values)


@dataclass
class WeightingConfig:
    method: str = "ew"                # ew | rlw | uw | dwa | pcgrad | graddrop | cagrad | mgda | imtl | nash_mtl | gradvac | aligned_mtl
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    hidden: list = field(default_factory=lambda: [400, 400, 400])  # trunk widths (MLP trunks)
    activation: str = "relu"
    init: Literal["torch", "he_uniform"] = "torch"  # MLP trunks: nn.Linear's uniform, or He-uniform weights and zero biases
    backbone: str = "mlp"             # supervised: lenet | resnet18 | transformer | segnet ...
    # every copy of a stage (shared, per group, per task) starts from the same weights, as in the
    # authors' code (one pretrained backbone); ensembles (SAC's twin critics) tie within each member
    tied_init: bool = True
    options: dict = field(default_factory=dict)
    # > 0: the width whose trunk under the run's fixed tree (hps, stl, manual) is closest to this many parameters
    # (ties: the narrower), written back here (hidden, options.width, options.d_model); RL: the actor's
    match_params: int = 0             # trunk parameter target for the width (0: off; widths as given)


@dataclass
class TrainConfig:
    # both domains. lr and grad_clip default per domain (DOMAIN_DEFAULTS, applied before files and overrides):
    # RL 3e-4 and 1.0 (the MT-SAC reference), supervised 1e-4 and 5.0; the values here are RL's (Config().domain)
    lr: float = 3e-4                  # RL: actor and critic (alpha: agent.alpha_lr); supervised: train.optimizer
    grad_clip: float = 1.0            # max global gradient norm (0: off); RL: actor and critic each
    # bf16 autocast; supervised: CUDA only (float32 elsewhere); RL: the SAC networks (slower on CPUs without bf16)
    amp: bool = False
    # torch.compile; supervised: the network; RL: the SAC losses (fixed architectures, no per-task gradients)
    compile: bool = False
    # torch.compile's mode; reduce-overhead adds CUDA graphs on GPUs (CPUs run it as default)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    threads: int = 0                  # torch CPU threads (0: torch's default); 1 avoids oversubscription on a busy CPU
    keep_checkpoints: int = 2
    report: bool = True               # a finished run writes its report (mtrl-arch report RUN_DIR) into RUN_DIR/report
    # RL
    total_env_steps: int = 20_000_000  # environment steps summed over all tasks (MT10: 2M per task)
    warmup_steps: int = 4_000         # vector steps of uniform random actions before learning
    updates_per_step: float = 1.0     # gradient steps per vector env step
    checkpoint_every_env_steps: int = 0  # env steps summed over tasks (0: only at the end)
    log_every: int = 1000             # env steps between training-metric lines
    save_replay: Literal["auto", "always", "never"] = "auto"  # replay in checkpoints (auto: when under 1 GiB)
    # supervised
    epochs: int = 1
    limit_batches: int = 0            # cap on batches per epoch and on search steps (0: no cap), for smoke runs
    batch_size: int = 256
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 1e-5
    momentum: float = 0.9
    lr_milestones: list = field(default_factory=list)  # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    checkpoint_every_epochs: int = 0  # 0: only at the end


@dataclass
class EvalConfig:
    every_env_steps: int = 500_000    # RL periodic evaluation, in env steps summed over tasks (0: only at the end)
    episodes_per_task: int = 10       # RL periodic evaluation episodes (final: metaworld's 50 goals unless final_episodes_per_task)
    final_episodes_per_task: int = 0  # 0: metaworld's protocol (one episode per goal variation, 50 per task)
    video: bool = False               # RL: after the final evaluation, one video per task into RUN_DIR/videos and W&B
    every_epochs: int = 1             # supervised: evaluate every N epochs (and after the last)
    limit_batches: int = 0            # supervised: cap on evaluation batches per split (0: all), for smoke runs
    batch_size: int = 0               # supervised: evaluation batch size (0: train.batch_size)
    baseline: dict = field(default_factory=dict)  # supervised: single-task test results {task: {metric: value}} for Delta_m
    baseline_run: str = ""            # supervised: an STL run directory whose last evaluation is the Delta_m baseline


@dataclass
class EnvConfig:
    name: str = "MT10"                # MT10 | MT50
    tasks: list = field(default_factory=list)  # subset by name; empty: all
    vector: Literal["sync", "async"] = "sync"
    max_episode_steps: int = 0        # 0: metaworld's default (500); evaluation always runs episodes this long
    train_episode_steps: int = 0      # training episodes only (more resets, more goals per env step); 0: max_episode_steps
    reward_version: str = "v2"


@dataclass
class AgentConfig:
    """Multi-task SAC (defaults: the MT-SAC reference setting for MT10)."""
    algo: Literal["mtsac", "sb3_stl"] = "mtsac"  # sb3_stl: one stable-baselines3 SAC per task (the paper's baseline)
    # lr, grad_clip, amp, compile, compile_mode: in train (one key for both domains)
    batch_per_task: int = 128
    alpha_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    buffer_size: int = 1_000_000      # transitions in total, split evenly over tasks
    init_alpha: float = 1.0
    # first: each update steps the entropy coefficients before the critic and actor losses, from a fresh draw of the
    # policy on the batch, and those losses use the new values (the MT-SAC reference's initial release); last: they
    # step after the actor from the actor loss's draw, with the old values in the losses (CleanRL, SB3, and the
    # reference's later releases)
    alpha_update: Literal["first", "last"] = "first"
    target_entropy: float = 0.0       # 0: -|A|
    adam_eps: float = 1e-5            # Adam's epsilon for the actor, critic and entropy coefficients (the reference's)
    critic_hidden: list = field(default_factory=list)  # empty: model.hidden
    critic_match_params: int = 0      # > 0: the critic's hidden width by model.match_params's rule (both members' trunks)
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    # weighting=dwa: RL has no epochs, so an "epoch" is this many updates; DWA weighs each task by the ratio of
    # its mean losses over the last two of them (the critic's and the actor's weightings separately)
    dwa_epoch_updates: int = 1000


@dataclass
class DataConfig:
    name: str = ""                    # multi_mnist | multi_fashion | multi_fashion_mnist | celeba | nyuv2 | cityscapes | glue
    root: str = ""                    # data directory
    tasks: list = field(default_factory=list)
    val_fraction: float = 0.1
    num_workers: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mtrl-arch"
    entity: str = ""
    group: str = ""
    tags: list = field(default_factory=list)


@dataclass
class Config:
    name: str = "run"
    domain: Literal["rl", "supervised"] = "rl"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    run_dir: str = ""                 # default runs/NAME-TIMESTAMP
    arch: ArchConfig = field(default_factory=ArchConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parsing ------------------------------------------------------------------------

# Widest trunk or critic layer: a square layer of it is 4 GiB of float32 weights; wider is a typo, which would
# otherwise surface as an allocation failure (or the OOM killer) when the networks are built.
MAX_WIDTH = 32768

# A bare section name set to a string sets that section's ``method`` (``weighting=pcgrad``).
_SHORTHAND = {"weighting": "method", "arch": "method"}

# Defaults that differ by domain: applied once the domain is known, before any file, base or override, so
# that each of those still wins. Values: what each domain has always used (RL: the MT-SAC reference).
DOMAIN_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "rl": {"train": {"lr": 3e-4, "grad_clip": 1.0}},
    "supervised": {"train": {"lr": 1e-4, "grad_clip": 5.0}},
}

# Renamed keys: old dotted key -> {domain: new key}. A file or override naming an old key is a one-line
# error naming the new one; a resolved config written before the rename (a run's config.yaml, a saved
# model) is read under the new names by config_from_dict. The agent.* keys applied to RL only: in a
# supervised run's record they hold unused defaults and are dropped.
_RENAMED: dict[str, dict[str, str]] = {
    **{f"agent.{k}": {"rl": f"train.{k}"} for k in ("lr", "grad_clip", "amp", "compile", "compile_mode")},
    "train.checkpoint_every": {"rl": "train.checkpoint_every_env_steps", "supervised": "train.checkpoint_every_epochs"},
    # the supervised backbones' option became one knob for every domain when the RL search networks were tied too
    "model.options.tied_init": {"rl": "model.tied_init", "supervised": "model.tied_init"},
}


def _renamed(key: str) -> ConfigError:
    new = _RENAMED[key]
    if len(set(new.values())) == 1:
        return ConfigError(f"{key} was renamed {next(iter(new.values()))}")
    return ConfigError(f"{key} was renamed: {new['rl']} in RL runs, {new['supervised']} in supervised runs")


def _migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A resolved config written before a rename, under the new names (see _RENAMED)."""
    d = dict(d)
    domain = d.get("domain", Config.domain)
    for old, new in _RENAMED.items():
        *path, leaf = old.split(".")
        parent = d
        for p in path:  # copy along the path: the caller's nested dicts stay as they were
            if not isinstance(parent.get(p), dict):
                break
            parent[p] = dict(parent[p])
            parent = parent[p]
        else:
            if leaf in parent:
                value = parent.pop(leaf)
                if domain in new:
                    *path2, leaf2 = new[domain].split(".")
                    target = d
                    for p in path2:
                        target[p] = dict(target.get(p) or {})
                        target = target[p]
                    target[leaf2] = value
    if domain == "rl" and isinstance(d.get("agent"), dict) and "alpha_update" not in d["agent"]:
        # written before agent.alpha_update existed: those runs stepped the entropy coefficients last
        d["agent"] = {**d["agent"], "alpha_update": "last"}
    return d


def _fresh(layers: list[dict[str, Any] | None]) -> Config:
    """A Config holding its domain's defaults; the domain is the last one ``layers`` (applied in order) set."""
    cfg = Config()
    domain = next((d["domain"] for d in reversed(layers) if isinstance(d, dict) and "domain" in d), cfg.domain)
    _apply(cfg, {"domain": domain})  # a bad domain: its one-line error here
    _apply(cfg, DOMAIN_DEFAULTS[cfg.domain])
    return cfg


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hint(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _unknown(key: str, valid) -> ConfigError:
    where, _, leaf = key.rpartition(".")
    return unknown_key(where, leaf, valid)


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    fields = _fields(type(obj))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise _renamed(key) if key in _RENAMED else _unknown(key, fields)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if isinstance(v, str) and k in _SHORTHAND:
                v = {_SHORTHAND[k]: v}
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be a mapping of its fields; got {v!r}")
            _apply(cur, v, key + ".")
        elif isinstance(cur, dict) and isinstance(v, dict):
            for old in (f"{key}.{o}" for o in v):
                if old in _RENAMED:
                    raise _renamed(old)
            if key in ("arch.actor", "arch.critic"):  # arch.critic.options.x=1 keeps arch.critic.options.y
                _deep_update(cur, v)
            else:
                cur.update(v)  # option mappings merge, so a.options.x=1 keeps a.options.y
        else:
            setattr(obj, k, coerce(v, _hint(type(obj), k), key))


def parse_value(text: str) -> Any:
    """An override's value: YAML scalars and lists (``[a,b]``); bare words stay strings."""
    try:
        return load_yaml_text(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(f"value {text[:40]!r}... nests too deeply") from None


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def config_dir() -> Path:
    return Path(str(resources.files("mtrl_arch.configs")))


def available_configs() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    cand = config_dir() / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    near = difflib.get_close_matches(name_or_path, available_configs(), n=3)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise ConfigError(f"no config named {name_or_path!r}{hint}; give a YAML path or one of: {', '.join(available_configs())}")


def load_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file (not UTF-8 at byte {e.start}); a config is YAML text") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(f"{path} nests its YAML too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    base = data.pop("base", None)  # a config may extend another by name
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a config name or YAML path; got {base!r}")
        chain = (*_chain, path.resolve())
        base_path = resolve_config_path(base)
        if base_path.resolve() in chain:
            raise ConfigError(f"{path}: base {base!r} extends itself ({' -> '.join(p.name for p in chain)} -> "
                              f"{base_path.name}); break the cycle")
        merged = load_yaml(base_path, chain)
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        k, v = item.split("=", 1)
        if not k:
            raise ConfigError(f"override {item!r} has no key")
        out.append((k.strip(), parse_value(v)))
    return out


def load_config(name_or_path: str | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Load a named or path config, apply overrides, validate. Raises ConfigError."""
    path = resolve_config_path(name_or_path) if name_or_path else None
    data = load_yaml(path) if path else None
    pairs = parse_overrides(list(overrides))
    cfg = _fresh([base, data, *(_nest(k, v) for k, v in pairs)])
    if base is not None:
        _apply(cfg, base)
    if path:
        _apply(cfg, data)
        if cfg.name == "run":
            cfg.name = path.stem
    file_method = cfg.arch.method
    for k, v in pairs:
        _apply(cfg, _nest(k, v))
    if cfg.arch.method != file_method:
        # the file's arch.options belong to the file's method (`mt10_conal arch.method=hps` must work):
        # keep only the options given on the command line
        cfg.arch.options = {}
        for k, v in pairs:
            if k == "arch.options" or k.startswith("arch.options."):
                _apply(cfg, _nest(k, v))
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """A resolved config (``Config.to_dict()``, a run's config.yaml), also one written before a key's rename."""
    d = _migrate(d)
    cfg = _fresh([d])
    _apply(cfg, d)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and cross-field checks, and method options, before anything heavy."""
    positive = {
        "train.lr": cfg.train.lr, "agent.alpha_lr": cfg.agent.alpha_lr,
        "train.batch_size": cfg.train.batch_size, "agent.batch_per_task": cfg.agent.batch_per_task,
        "agent.buffer_size": cfg.agent.buffer_size, "agent.init_alpha": cfg.agent.init_alpha,
        "agent.adam_eps": cfg.agent.adam_eps,
    }
    for k, v in positive.items():
        if not v > 0:
            raise ConfigError(f"{k} must be positive; got {v}")
    non_negative = {
        "train.total_env_steps": cfg.train.total_env_steps, "train.warmup_steps": cfg.train.warmup_steps,
        "train.epochs": cfg.train.epochs, "train.limit_batches": cfg.train.limit_batches,
        "train.weight_decay": cfg.train.weight_decay, "train.grad_clip": cfg.train.grad_clip,
        "train.checkpoint_every_env_steps": cfg.train.checkpoint_every_env_steps,
        "train.checkpoint_every_epochs": cfg.train.checkpoint_every_epochs, "arch.search_steps": cfg.arch.search_steps,
        "eval.every_env_steps": cfg.eval.every_env_steps, "eval.episodes_per_task": cfg.eval.episodes_per_task,
        "train.updates_per_step": cfg.train.updates_per_step,
        "env.max_episode_steps": cfg.env.max_episode_steps, "env.train_episode_steps": cfg.env.train_episode_steps,
        "train.threads": cfg.train.threads,
    }
    for k, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{k} must be >= 0; got {v}")
    # a resolved config holds both cadences, so the other domain's must be left at 0 (unset)
    other = "checkpoint_every_epochs" if cfg.domain == "rl" else "checkpoint_every_env_steps"
    if getattr(cfg.train, other):
        own = "checkpoint_every_env_steps" if cfg.domain == "rl" else "checkpoint_every_epochs"
        raise ConfigError(f"train.{other} does not apply to {cfg.domain} runs; set train.{own}")
    if not 0.0 < cfg.agent.gamma <= 1.0:
        raise ConfigError(f"agent.gamma must be in (0, 1]; got {cfg.agent.gamma}")
    if not 0.0 < cfg.agent.tau <= 1.0:
        raise ConfigError(f"agent.tau must be in (0, 1]; got {cfg.agent.tau}")
    if cfg.agent.dwa_epoch_updates < 1:
        raise ConfigError(f"agent.dwa_epoch_updates must be >= 1; got {cfg.agent.dwa_epoch_updates}")
    if not 0.0 <= cfg.arch.cn_fraction < 1.0:
        raise ConfigError(f"arch.cn_fraction must be in [0, 1); got {cfg.arch.cn_fraction}")
    if not 0.0 <= cfg.arch.val_fraction < 1.0:
        raise ConfigError(f"arch.val_fraction must be in [0, 1); got {cfg.arch.val_fraction}")
    if cfg.arch.derive not in ("argmax", "margin"):
        raise ConfigError(f"arch.derive must be one of argmax, margin; got {cfg.arch.derive!r}")
    if not 0.0 <= cfg.arch.derive_margin < 1.0:
        raise ConfigError(f"arch.derive_margin must be in [0, 1); got {cfg.arch.derive_margin}")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints must be at least 1")
    if cfg.eval.video and cfg.domain != "rl":
        raise ConfigError("eval.video records rollouts of RL runs; leave it false for supervised runs")
    if cfg.env.name not in ("MT10", "MT50"):
        raise ConfigError(f"env.name must be MT10 or MT50; got {cfg.env.name!r}")
    for key, widths in (("model.hidden", cfg.model.hidden), ("agent.critic_hidden", cfg.agent.critic_hidden)):
        if not all(isinstance(h, int) and not isinstance(h, bool) and 0 < h <= MAX_WIDTH for h in widths):
            raise ConfigError(f"{key} must be a list of positive integers (at most {MAX_WIDTH}); got {widths}")
    from .trunk import ACTIVATIONS
    if cfg.model.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {', '.join(sorted(ACTIVATIONS))}; got {cfg.model.activation!r}")
    if not 0 <= cfg.seed < 2**32:  # numpy's seeding takes 32 bits
        raise ConfigError(f"seed must be in [0, 2^32); got {cfg.seed}")
    for key, value, room in (("run_dir", cfg.run_dir, 0), ("name", cfg.name, len("-YYYYmmdd-HHMMSS"))):
        if "\0" in value:
            raise ConfigError(f"{key} must not hold a NUL character")
        too_long = [p for p in Path(value).parts if len(p.encode("utf-8", "surrogateescape")) + room > 255]
        if too_long:  # a file system's limit on one name: caught here, not by a half-made run directory
            raise ConfigError(f"{key}: the name {too_long[0][:40]!r}... is longer than a file name may be "
                              f"({255 - room} bytes)")
    per_network = cfg.arch.actor or cfg.arch.critic
    if per_network and cfg.domain != "rl":
        raise ConfigError("arch.actor and arch.critic set one RL network's arch; a supervised run has one trunk: "
                          "set arch.* instead")
    if per_network and cfg.agent.algo == "sb3_stl":
        raise ConfigError("agent.algo=sb3_stl trains one network per task: set arch.method=stl, without arch.actor "
                          "or arch.critic")
    if cfg.agent.algo == "sb3_stl" and cfg.arch.method != "stl":
        raise ConfigError(f"agent.algo=sb3_stl trains one network per task: set arch.method=stl (got {cfg.arch.method!r})")
    archs = {n: network_arch(cfg.arch, n) for n in NETWORKS} if per_network else {"": cfg.arch}
    for net, arch in archs.items():
        _check_method(arch, f"arch.{net}." if net else "arch.", cfg.arch.search_steps)
    _check_width_match(cfg)
    if per_network:  # the resolved config shows what each network uses
        for net, arch in archs.items():
            setattr(cfg.arch, net, {k: getattr(arch, k) for k in PER_NETWORK})
    from . import weighting as W
    try:
        W.make_weighting(cfg.weighting.method, n_tasks=2, **cfg.weighting.options)
    except ConfigError:
        raise  # already one line naming its key
    except (ValueError, TypeError) as e:
        raise ConfigError(f"weighting: {e}") from None


def _check_width_match(cfg: Config) -> None:
    """model.match_params / agent.critic_match_params: positive targets for networks with a tree known up front."""
    from .search import get_method

    targets = {"model.match_params": (cfg.model.match_params, "actor" if cfg.domain == "rl" else None)}
    if cfg.domain == "rl":
        targets["agent.critic_match_params"] = (cfg.agent.critic_match_params, "critic")
    elif cfg.agent.critic_match_params:
        raise ConfigError("agent.critic_match_params applies to RL runs; a supervised run sizes its trunk with "
                          "model.match_params")
    for key, (n, net) in targets.items():
        if n < 0:
            raise ConfigError(f"{key} must be >= 0 (0: off); got {n}")
        method = (network_arch(cfg.arch, net) if net else cfg.arch).method
        if n and (get_method(method).searches or method == "random"):
            raise ConfigError(f"{key} sizes a network under a tree known before training (hps, stl, manual); "
                              f"its method is {method}")


def _check_method(arch: ArchConfig, where: str, search_steps: int) -> None:
    """The method, its options and derive rule (``where``: ``arch.`` or ``arch.actor.``, naming the keys)."""
    from .search import DeriveRule, get_method  # config -> search only for validation
    try:
        method = get_method(arch.method)
        parse_options(method.Options, arch.options, f"{where}options")
        # combinations (max_params with margin) and what the method supports; the budget's lower
        # bound needs the network, so make_method checks it
        method.check_derive_rule(DeriveRule.of(arch))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if method.searches and search_steps <= 0:
        raise ConfigError(f"{where}method={arch.method} searches: set arch.search_steps > 0 (e.g. arch.search_steps=1000)")


def to_yaml(cfg: Config, extra: dict[str, Any] | None = None) -> str:
    d = cfg.to_dict()
    if extra:
        d = {**d, **extra}
    return yaml.safe_dump(d, sort_keys=False)
