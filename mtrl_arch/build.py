"""Composition root: a validated config -> environment or data, networks, method, logger, loop.

The only module (with the CLI) that knows every domain; the core below it does not. Also
the networks' parameter counts without an environment or data (``train --dry-run``) and
``mtrl-arch bench``'s registry (the core's trunk benchmark and the RL adapters').
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import load_latest
from .config import Config, ConfigError, config_from_dict
from .logger import Logger
from .run import resolve_device, seed_everything, write_arch, write_run_info
from .tree import Tree


def train_episode_steps(cfg: Config) -> int | None:
    """Training episodes' length (``env.train_episode_steps``, else ``env.max_episode_steps``; None: metaworld's);
    evaluation keeps ``env.max_episode_steps``."""
    return cfg.env.train_episode_steps or cfg.env.max_episode_steps or None


def match_rl_widths(cfg: Config) -> None:
    """``model.match_params`` (actor) and ``agent.critic_match_params`` (critic, both members): one hidden width per
    network, keeping its depth, whose trunk under the network's fixed tree is closest to the target
    (:mod:`mtrl_arch.search.width`); written to ``model.hidden`` / ``agent.critic_hidden``. A critic without
    hidden widths of its own follows the actor's, as always."""
    m, a = cfg.model, cfg.agent
    if not (m.match_params or a.critic_match_params):
        return
    from .agents.sac import actor_spec, critic_spec
    from .config import network_arch
    from .envs.metaworld import ACTION_DIM, observation_dim, resolve_tasks
    from .search.width import fixed_trunk_params, match_width

    try:
        tasks = resolve_tasks(cfg.env.name, cfg.env.tasks or None)
    except ValueError as e:
        raise ConfigError(f"env.tasks: {e}") from None
    obs = observation_dim(len(tasks))
    critic_depth = len(a.critic_hidden or m.hidden)
    for target, net, make, depth in ((m.match_params, "actor", actor_spec, len(m.hidden)),
                                     (a.critic_match_params, "critic", critic_spec, critic_depth)):
        if not target:
            continue
        arch = network_arch(cfg.arch, net)
        width, _ = match_width(lambda w: fixed_trunk_params(arch.method, make(tasks, obs, ACTION_DIM, [w] * depth,
                                                                               m.activation, m.init),
                                                            arch.options, cfg.seed),
                               target, "model.hidden" if net == "actor" else "agent.critic_hidden")
        if net == "actor":
            m.hidden = [width] * depth
        else:
            a.critic_hidden = [width] * depth


def train_rl(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
             trust_file: bool = False) -> dict[str, Any]:
    from . import distributed
    from .agents.rl_loop import RLRun, shared_state
    from .loop import Run, find_resume
    from .agents.sac import MTSAC
    from .envs.metaworld import MetaWorldMT, evaluate, resolve_tasks

    try:
        tasks = resolve_tasks(cfg.env.name, cfg.env.tasks or None)
    except ValueError as e:
        raise ConfigError(f"env.tasks: {e}") from None
    match_rl_widths(cfg)  # before config.yaml is written: it shows the widths
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if cfg.agent.algo == "sb3_stl":
        return _train_sb3_stl(cfg, run_dir, tasks, device, resume, progress, trust_file)
    # data-parallel (torchrun): every rank trains on its own envs, rank 0 alone reads and writes the run directory
    main = distributed.is_main()
    videos = main and _can_render(cfg)
    found = find_resume(run_dir, lambda d: shared_state(d, MTSAC.RANK_LOCAL), trust_file) if resume else None
    # the same goals on every rank (env seed = run seed); each rank's episodes are seeded by RLRun
    env = MetaWorldMT(cfg.env.name, tasks, seed=cfg.seed, vector=cfg.env.vector,
                      max_episode_steps=train_episode_steps(cfg), reward_version=cfg.env.reward_version)
    try:
        logger = None
        env_meta = env.metadata()
        if found is None and main:
            extra = {"world_size": distributed.world_size()} if distributed.active() else {}
            write_run_info(run_dir, cfg, {"env": env_meta, **extra})
        agent = MTSAC.from_env(env, cfg, device)
        if main:
            logger = Logger(run_dir, cfg.wandb, {**cfg.to_dict(), "env_metadata": env_meta}, run_dir.name,
                            resume_step=found[0] if found else (-1 if resume else None))

        def on_arch(trees):
            write_arch(run_dir, trees)
            for k, t in trees.items():
                logger.log_text(f"arch/{k}", t.render())
            logger.log({f"params/{n}/{k}": v for n, c in agent.param_counts().items() for k, v in c.items()},
                       learner.num_timesteps)

        evaluate_fn = lambda policy, k: evaluate(policy, cfg.env.name, tasks, cfg.seed, k,  # noqa: E731
                                                 cfg.env.max_episode_steps or None, env.benchmark_obj, env.reward_version)
        learner = RLRun(agent, env, on_arch if main else None, evaluate_fn if main else None)
        run = Run(learner, cfg, run_dir if main else None, logger, progress and main)
        agent.run = run  # SB3's verbs on the agent (num_timesteps, logger) read the run
        if found is not None:
            run.restore(found)
        elif main and not agent.searching:
            on_arch(agent.trees)  # logs the parameter counts too
        elif main:  # the search network's counts
            logger.log({f"params/{n}/{k}": v for n, c in agent.param_counts().items() for k, v in c.items()}, 0)
        with run.signals():  # SIGINT/SIGTERM: checkpoint, flush, return (exit 0)
            run.learn(cfg.train.total_env_steps)
            final = run.final_evaluate() if main else None
        if final is not None:  # finished (not stopped): the final model, written atomically
            logger.summary(final)
            agent.save(str(run_dir / "model.pt"))  # atomically
            if videos:
                _final_videos(cfg, run_dir, logger, learner.progress())
        return dict(learner.last_eval)
    finally:
        if logger is not None:
            logger.close()
        env.close()


def _train_sb3_stl(cfg: Config, run_dir: Path, tasks, device, resume: bool, progress: bool,
                   trust_file: bool) -> dict[str, Any]:
    from .agents.sb3_baseline import SB3Run
    from .checkpoint import list_steps
    from .envs.metaworld import MetaWorldMT, evaluate, make_task_env
    from .loop import Run, find_resume

    folder = run_dir / "checkpoints"
    if resume and not list_steps(folder) and (folder / "sb3").is_dir():
        raise ConfigError(f"{run_dir} was checkpointed by an older mtrl-arch (checkpoints/sb3/, no checksums) and "
                          "cannot be resumed; `mtrl-arch eval` still reads its models; start a new run to train on")
    found = find_resume(run_dir, trust_file=trust_file) if resume else None
    videos = _can_render(cfg)
    # the settings record of the same tasks; each SB3 agent sees its task's 39-d obs without the one-hot
    meta_env = MetaWorldMT(cfg.env.name, tasks, seed=cfg.seed, max_episode_steps=cfg.env.max_episode_steps or None,
                           reward_version=cfg.env.reward_version, one_hot=False)
    env_meta = meta_env.metadata()
    meta_env.close()
    if not resume:
        write_run_info(run_dir, cfg, {"env": env_meta})
    steps = cfg.env.max_episode_steps or None
    learner = SB3Run(cfg, tasks, str(device),
                     lambda task: make_task_env(cfg.env.name, task, cfg.seed, train_episode_steps(cfg), cfg.env.reward_version),
                     lambda policy, k: evaluate(policy, cfg.env.name, tasks, cfg.seed, k, steps, None,
                                                cfg.env.reward_version, one_hot=False), trust_file)
    logger = None
    try:
        logger = Logger(run_dir, cfg.wandb, {**cfg.to_dict(), "env_metadata": env_meta}, run_dir.name,
                        resume_step=found[0] if found else (-1 if resume else None))
        run = Run(learner, cfg, run_dir, logger, progress)
        if found is not None:
            run.restore(found)
        else:
            logger.log({"params/sb3_policies/total": learner.model.param_count()}, 0)
        with run.signals():  # SIGINT/SIGTERM: checkpoint, flush, return (exit 0)
            run.learn(cfg.train.total_env_steps)
            final = run.final_evaluate()
        if final is not None:
            logger.summary(final)
            learner.save_model(run_dir / "model.pt")
            if videos:
                _final_videos(cfg, run_dir, logger, learner.progress())
        return dict(learner.last_eval)
    finally:
        if logger is not None:
            logger.close()
        learner.close()


def _rl_policy(run_dir: Path, cfg: Config, trust_file: bool = False) -> tuple[Any, tuple[str, ...], bool]:
    """A run's deterministic policy (``model.pt``, else its latest checkpoint), its tasks, and whether its
    observations carry the task one-hot (MT-SAC) or not (one SB3 agent per task). ``trust_file``: read them
    with full pickle (:mod:`mtrl_arch.safe_load`)."""
    from .agents.sac import MTSAC
    from .envs.metaworld import ACTION_DIM, observation_dim, resolve_tasks

    tasks = resolve_tasks(cfg.env.name, cfg.env.tasks or None)
    if cfg.agent.algo == "sb3_stl":
        from .agents.sb3_baseline import load_sb3_policy
        from .envs.metaworld import make_task_env

        steps = cfg.env.max_episode_steps or None
        policy = load_sb3_policy(run_dir, cfg, tasks, lambda task: make_task_env(cfg.env.name, task, cfg.seed, steps,
                                                                                cfg.env.reward_version),
                                 str(resolve_device(cfg.device)), trust_file)
        return policy.act, tasks, False
    model = run_dir / "model.pt"
    if model.is_file():
        agent = MTSAC.load(str(model), device=resolve_device(cfg.device), trust_file=trust_file)
    else:
        found = load_latest(run_dir / "checkpoints", trust_file=trust_file)
        if found is None:
            raise ConfigError(f"{run_dir} has neither model.pt nor a readable checkpoint to evaluate")
        agent = MTSAC(tasks, observation_dim(len(tasks)), ACTION_DIM, cfg, resolve_device(cfg.device))
        agent.load_state_dict(found[1]["agent"])
    return (lambda o: agent.act(o, deterministic=True)), tuple(agent.tasks), True


def eval_rl(run_dir: Path, episodes: int | None, cfg: Config, trust_file: bool = False) -> dict[str, Any]:
    from .envs.metaworld import evaluate

    policy, tasks, one_hot = _rl_policy(run_dir, cfg, trust_file)
    res = evaluate(policy, cfg.env.name, tasks, cfg.seed, episodes, cfg.env.max_episode_steps or None, None,
                   cfg.env.reward_version, one_hot=one_hot)
    return {"success_rate": res["success_rate"], "mean_success_rate": res["mean_success_rate"],
            "episodes_per_task": res["episodes_per_task"]}


def videos_rl(cfg: Config, run_dir: Path, out_dir: Path, episodes: int | None = None,
              trust_file: bool = False) -> dict[str, dict]:
    """``eval --video``: one video per task of the run's deterministic policy (its first ``episodes``
    evaluation episodes, default 1) in ``out_dir``; :func:`mtrl_arch.envs.video.record_videos`'s result.
    Raises RendererUnavailable (a ConfigError) when nothing can render, before the model is loaded."""
    if cfg.domain != "rl":
        raise ConfigError(f"{run_dir} is a supervised run; videos are rollouts of RL runs (mtrl-arch eval without --video)")
    if episodes is not None and episodes < 1:
        raise ConfigError(f"--episodes must be at least 1; got {episodes}")
    from .envs.video import offscreen_backend, record_videos

    offscreen_backend()  # fails (one line) before anything is loaded
    policy, tasks, one_hot = _rl_policy(run_dir, cfg, trust_file)
    return record_videos(policy, cfg.env.name, tasks, cfg.seed, out_dir, episodes or 1,
                         cfg.env.max_episode_steps or None, None, cfg.env.reward_version, one_hot)


def _can_render(cfg: Config) -> bool:
    """Whether ``eval.video`` asks for videos and something can render them; if not, one warning line now
    (not after hours of training), and the run goes on."""
    if not cfg.eval.video:
        return False
    from .envs.video import RendererUnavailable, offscreen_backend

    try:
        offscreen_backend()
    except RendererUnavailable as e:
        warnings.warn(f"eval.video: {e}; training goes on, without videos", stacklevel=2)
        return False
    return True


def _final_videos(cfg: Config, run_dir: Path, logger: Logger, step: int) -> None:
    """``eval.video``: the saved model's videos into ``run_dir/videos`` and to W&B; never stops the run
    (a failure is one warning line: the model and the logs are already written)."""
    try:
        videos = videos_rl(cfg, run_dir, run_dir / "videos")
    except Exception as e:  # noqa: BLE001 - a video is never worth the run
        warnings.warn(f"eval.video: no videos ({' '.join(str(e).split())[:300]}); the run's results are saved",
                      stacklevel=2)
        return
    print(f"videos: {run_dir / 'videos'}", file=sys.stderr)
    logger.log_videos({f"video/{t}": v["path"] for t, v in videos.items()}, step,
                      {f"video/{t}": v["caption"] for t, v in videos.items()})


def train_supervised(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
                     make_adapter: Any = None, trust_file: bool = False) -> dict[str, Any]:
    """Search (if the method searches), derive, retrain and evaluate (see :mod:`mtrl_arch.agents.supervised`)."""
    from . import distributed
    from .agents.supervised import SupervisedRun, check_loop_config
    from .loop import Run, find_resume

    if make_adapter is None:
        from .envs.supervised import make_adapter
    check_loop_config(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    adapter = make_adapter(cfg)  # bad config or missing data fail here, before anything is written
    # data-parallel (torchrun): every rank trains, rank 0 alone reads and writes the run directory
    main = distributed.is_main()
    found = find_resume(run_dir, trust_file=trust_file) if resume else None
    if distributed.active() and cfg.train.batch_size % distributed.world_size() and main:
        print(f"warning: train.batch_size={cfg.train.batch_size} does not divide by {distributed.world_size()} "
              "processes: each batch is padded with its first examples (as DistributedSampler)", file=sys.stderr)
    if not resume and main:
        extra = {"world_size": distributed.world_size()} if distributed.active() else {}
        write_run_info(run_dir, cfg, {"data": adapter.info, **extra})
    logger = Logger(run_dir, cfg.wandb, {**cfg.to_dict(), "data_info": adapter.info}, run_dir.name,
                    resume_step=found[0] if found else (-1 if resume else None)) if main else None  # -1: restart

    def on_arch(tree):
        write_arch(run_dir, {"trunk": tree})
        logger.log_text("arch/trunk", tree.render())
        logger.log(learner.param_counts(), learner.step)

    learner = SupervisedRun(cfg, adapter, device, on_arch if main else None)
    run = Run(learner, cfg, run_dir if main else None, logger, progress and main)
    try:
        if found is not None:
            run.restore(found)
        elif learner.searching:
            if logger is not None:
                logger.log(learner.param_counts(), 0)
        elif main:
            on_arch(learner.tree)
        with run.signals():
            run.learn()
            if not run.stopped_by and not learner.last_eval:  # e.g. train.epochs=0: evaluate what was derived
                run.final_evaluate()
        out = {**learner.last_eval, **learner.param_counts(), "time/wall_s": run.wall_s()}
        if not run.stopped_by and main:
            learner.save_model(run_dir / "model.pt")
            logger.summary(out)
        return out
    finally:
        if logger is not None:
            logger.close()


def eval_supervised(cfg: Config, run_dir: Path, make_adapter: Any = None, trust_file: bool = False) -> dict[str, Any]:
    """Evaluate a run's final model (``model.pt``) or, failing that, its latest checkpoint."""
    from .agents.supervised import SupervisedRun

    if make_adapter is None:
        from .envs.supervised import make_adapter
    run = SupervisedRun(cfg, make_adapter(cfg), resolve_device(cfg.device))
    model = run_dir / "model.pt"
    if model.is_file():
        run.load_model(model, trust_file)
    else:
        found = load_latest(run_dir / "checkpoints", trust_file=trust_file)
        if found is None:
            raise ConfigError(f"{run_dir} has neither model.pt nor a readable checkpoint to evaluate")
        run.load_state_dict(found[1])
    return {**run.evaluate(), **run.param_counts()}


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          trust_file: bool = False) -> dict[str, Any]:
    """Train (or, ``resume``, continue) the run in ``run_dir``; ``trust_file``: read its checkpoints with full
    pickle (the user's opt-in for files they trust, see :mod:`mtrl_arch.safe_load`)."""
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    if cfg.domain == "rl":
        return train_rl(cfg, run_dir, resume, progress, trust_file)
    return train_supervised(cfg, run_dir, resume, progress, trust_file=trust_file)


def report(run_dirs: list[Path], out: Path | None = None, reference: Path | None = None,
           baseline: str | None = None) -> Path:
    """``mtrl-arch report``: :func:`mtrl_arch.report.make_report` with the dense-prediction metrics' directions."""
    from .envs.vision_metrics import LOWER_IS_BETTER as dense
    from .report import make_report

    return make_report(run_dirs, out, reference, baseline, dense)


def report_at_end(cfg: Config, run_dir: Path, since: float) -> Path | None:
    """The run's own report in ``RUN_DIR/report`` (what ``mtrl-arch report RUN_DIR --out RUN_DIR/report`` writes)
    once a training has finished: ``model.pt`` written since ``since`` (a run stopped by a signal writes none).
    None when ``train.report`` is off or the run stopped; a failing report is one warning line, never the run's
    failure (its checkpoint and model are saved before)."""
    model = run_dir / "model.pt"
    # 1 s of slack: a file's mtime comes from a coarser clock than time.time(); no training finishes within it
    if not cfg.train.report or not model.is_file() or model.stat().st_mtime < since - 1.0:
        return None
    try:
        with warnings.catch_warnings():  # a figure's layout notes are no news at the end of a training
            warnings.simplefilter("ignore")
            return report([run_dir], run_dir / "report")
    except Exception as e:  # noqa: BLE001 - the run is saved; a figure must not fail it
        print(f"warning: the run's report failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); the run is "
              f"saved; retry with `mtrl-arch report {run_dir}`", file=sys.stderr)
        return None


def evaluate_run(cfg: Config, run_dir: Path, episodes: int | None, trust_file: bool = False) -> dict[str, Any]:
    if cfg.domain == "rl":
        return eval_rl(run_dir, episodes, cfg, trust_file)
    return eval_supervised(cfg, run_dir, trust_file=trust_file)


def param_counts(cfg: Config) -> tuple[dict[str, dict[str, int]] | None, str, dict[str, Tree]]:
    """The weight counts of the networks a run of ``cfg`` starts with, what was counted, and the trees
    known before training (methods that do not search: hps, stl, manual, random's drawn tree; else none).
    Widths matched to a parameter count (``model.match_params``) are written to ``cfg``, as a run writes them.

    Built on the CPU without an environment or data: RL's MT-SAC actor and critic (their
    search networks while ``arch.search_steps`` > 0; the counts ``params/actor/*`` and
    ``params/critic/*`` of a run's first log), the supervised adapter's trunk (``params/trunk/*``,
    or ``params/search/total``). None, with the reason, where the data decides the network.
    """
    if cfg.domain == "rl":
        if cfg.agent.algo == "sb3_stl":
            return None, ("counts need the environments: agent.algo=sb3_stl trains one stable-baselines3 SAC per "
                          "task, whose networks SB3 builds from the task's environment"), {}
        from .agents.sac import MTSAC
        from .envs.metaworld import ACTION_DIM, observation_dim, resolve_tasks

        try:
            tasks = resolve_tasks(cfg.env.name, cfg.env.tasks or None)
        except ValueError as e:
            raise ConfigError(f"env.tasks: {e}") from None
        match_rl_widths(cfg)
        d = cfg.to_dict()  # the counts do not depend on the device, the replay's size or compilation
        d["device"] = "cpu"
        d["agent"]["buffer_size"], d["train"]["compile"] = len(tasks), False
        agent = MTSAC(tasks, observation_dim(len(tasks)), ACTION_DIM, config_from_dict(d), "cpu")
        what = ("the actor's and critic's search networks (arch.search_steps > 0; the derived trees are counted "
                "when the search ends)" if agent.searching else "the actor and critic (both critics of the ensemble)")
        return (agent.param_counts(), f"{what}, {len(tasks)} tasks, obs {agent.obs_dim}, action {agent.action_dim}",
                dict(agent.trees))
    from .envs.supervised import make_spec
    from .search import make_method
    from .steps import weight_parameters
    from .trunk import Trunk

    spec = make_spec(cfg)
    if spec is None:
        return None, (f"counts need the data: data.name={cfg.data.name} learns its vocabulary, hence the embedding's "
                      "size, from the training text"), {}
    method = make_method(cfg.arch.method, spec, cfg.arch.options, cfg.seed, derive=cfg.arch)
    if method.searches and cfg.arch.search_steps > 0:
        total = sum(p.numel() for p in weight_parameters(method.build()))
        return ({"search": {"total": total}}, "the search network (arch.search_steps > 0; the derived tree's trunk "
                                              "is counted when the search ends)", {})
    tree = method.derive()
    return {"trunk": Trunk(tree, spec.stages, spec.heads).param_counts()}, "the trunk of the derived tree", {"trunk": tree}


def benchmarks() -> dict[str, tuple[type, Any]]:
    """``mtrl-arch bench``'s registry: name -> (options dataclass, function), the core's and the RL adapters'."""
    from .agents.bench_rl import BENCHES as RL_BENCHES
    from .bench import BENCHES

    return {**BENCHES, **RL_BENCHES}
