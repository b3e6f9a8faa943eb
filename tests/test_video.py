"""Rollout videos on real Meta-World, rendered off-screen by real MuJoCo (EGL or OSMesa), read back from the files.

Where nothing can render, the render tests skip on a developer's machine and fail under CI (``CI=true``),
whose .ci/run installs OSMesa: a missing renderer there is a broken install, not a reason to skip.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mtrl_arch.cli import main
from mtrl_arch.config import ConfigError, load_config
from mtrl_arch.envs import video
from mtrl_arch.envs.metaworld import evaluate, record_episodes
from mtrl_arch.logger import read_wandb_history

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # metaworld's scripted policies warn that their gains exceed the [-1, 1] action box
              pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")]

TINY = ["env.tasks=[reach-v3]", "train.total_env_steps=60", "train.warmup_steps=50", "eval.every_env_steps=0",
        "eval.final_episodes_per_task=1", "env.max_episode_steps=30", "model.hidden=[32,32]", "agent.buffer_size=1000",
        "agent.batch_per_task=16", "train.threads=1", "device=cpu", "--no-progress"]


@pytest.fixture(scope="module")
def backend() -> str:
    try:
        return video.offscreen_backend()
    except video.RendererUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must render videos (its .ci/run installs OSMesa): {e}")
        pytest.skip(str(e))


def read_frames(path) -> np.ndarray:
    """Every frame of an MP4 or GIF file, ``[n, H, W, 3]`` uint8."""
    if path.suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG")


def frames_of(lengths: list[int], stride: int) -> int:
    """A frame after each reset, every ``stride``-th step and each episode's last step."""
    return sum(1 + math.ceil(n / stride) for n in lengths)


def scripted(tasks):
    from metaworld.policies import ENV_POLICY_MAP

    pols = [ENV_POLICY_MAP[t]() for t in tasks]
    return lambda obs: np.stack([p.get_action(obs[i, :39]) for i, p in enumerate(pols)]).astype(np.float32)


def test_a_short_episode_reads_back_as_it_was_recorded(backend, tmp_path) -> None:
    """The expert's reach-v3 episode (cut at 40 steps) as a file: one frame per 2 steps plus the first and
    last, 96 px square, frames that change and are not blank; the episode is the evaluation's first one."""
    tasks = ["reach-v3"]
    res = video.record_videos(scripted(tasks), "MT10", tasks, 0, tmp_path, max_episode_steps=40, size=96, stride=2)
    out = res["reach-v3"]
    assert out["path"] == tmp_path / f"reach-v3.{video.video_format()}"
    (ep,) = out["episodes"]
    frames = read_frames(out["path"])
    assert len(frames) == out["frames"] == frames_of([ep["length"]], 2)
    assert frames.shape[1:] == (96, 96, 3)
    assert all(f.std() > 10 for f in frames)  # a scene, not one colour
    assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 1  # the arm moved
    first = evaluate(scripted(tasks), "MT10", tasks, 0, 1, 40)["episodes"]["reach-v3"][0]
    assert {k: ep[k] for k in ("length", "success", "terminated")} == \
        {k: first[k] for k in ("length", "success", "terminated")}
    assert ep["return"] == pytest.approx(first["return"], rel=1e-6)
    assert out["caption"] == f"reach-v3: {'success' if ep['success'] else 'failure'} in {ep['length']} steps"


def test_frames_are_upright_and_not_mirrored(backend) -> None:
    """Moving the hand up (+z) and along +x: the gripper's cyan finger pad moves up and to the right in the
    corner camera's image (which looks along about +x+y, so +x is to the right). Metaworld's own frames
    from this camera come out upside down."""
    frames = []
    record_episodes(lambda o: np.tile(np.float32([1, 0, 1, 0]), (len(o), 1)), "MT10", ["reach-v3"], 0,
                    lambda t, f: frames.append(f), max_episode_steps=12, size=128, stride=12)
    assert len(frames) == 2  # after the reset, after the 12th (last) step

    def pad(f):
        ys, xs = np.nonzero((f[..., 0] < 100) & (f[..., 1] > 180) & (f[..., 2] > 180))
        assert len(ys) >= 5, "the cyan finger pad is not in view"
        return ys.mean(), xs.mean()

    (y0, x0), (y1, x1) = pad(frames[0]), pad(frames[1])
    assert y1 < y0 - 3 and x1 > x0 + 3


def test_each_task_of_a_vector_env_renders_as_it_does_alone(backend) -> None:
    """Two tasks in one process, each env with its own GL context: every frame equals the frame of the same
    task recorded by itself (no frame from the other env's scene or context)."""
    def record(tasks):
        frames = {}
        record_episodes(lambda o: np.tile(np.float32([0, 1, -1, 0]), (len(o), 1)), "MT10", tasks, 0,
                        lambda t, f: frames.setdefault(t, []).append(f), max_episode_steps=4, size=64, stride=2)
        return frames

    both = record(["reach-v3", "push-v3"])
    assert {t: len(v) for t, v in both.items()} == {"reach-v3": 3, "push-v3": 3}
    for t in both:
        assert np.array_equal(np.stack(both[t]), np.stack(record([t])[t])), t
    assert not np.array_equal(both["reach-v3"][0], both["push-v3"][0])


def test_gif_writer_round_trip(tmp_path) -> None:
    """The writer without ffmpeg: GIF through Pillow, every frame and its size kept."""
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    frames = [np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(40 * i)), -1) for i in range(5)]
    w = video.VideoWriter(tmp_path / "x", fps=40, fmt="gif")
    for f in frames:
        w.append(np.ascontiguousarray(f))
    path = w.close()
    assert path == tmp_path / "x.gif" and w.n_frames == 5
    back = read_frames(path)
    assert back.shape == (5, 32, 32, 3)
    assert np.abs(back.astype(int) - np.stack(frames)).mean() < 8  # GIF's palette: close, not exact


@pytest.fixture(scope="module")
def tiny_run(backend, tmp_path_factory):
    """A few-seconds MT-SAC run on reach-v3 with eval.video=true and offline W&B."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "mt10_quick", *TINY, "eval.video=true", "wandb.mode=offline", f"run_dir={run_dir}"]) == 0
    return run_dir


def test_training_with_eval_video_writes_and_logs_the_videos(tiny_run) -> None:
    path = tiny_run / "videos" / f"reach-v3.{video.video_format()}"
    frames = read_frames(path)
    assert frames.shape[1:] == (video.VIDEO_SIZE, video.VIDEO_SIZE, 3) and len(frames) >= 2
    rows = [r for r in read_wandb_history(tiny_run) if "video/reach-v3/_type" in r]
    assert len(rows) == 1 and rows[0]["_step"] == 60
    logged = rows[0]
    assert logged["video/reach-v3/_type"] == "video-file" and logged["video/reach-v3/size"] == path.stat().st_size
    assert logged["video/reach-v3/caption"].startswith("reach-v3: ")
    media = list(tiny_run.glob(f"wandb/*run-*/files/{logged['video/reach-v3/path']}"))
    assert len(media) == 1 and media[0].read_bytes() == path.read_bytes()


def test_eval_video_records_the_runs_policy(tiny_run, tmp_path, capsys) -> None:
    """`eval --video DIR --episodes 2`: one file, both episodes; its first episode is the final
    evaluation's video again (same saved model, same goal, deterministic policy)."""
    out = tmp_path / "v"
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--video", str(out), "--episodes", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().endswith(f"videos written to {out}")
    path = out / f"reach-v3.{video.video_format()}"
    assert [p.name for p in out.iterdir()] == [path.name]
    frames, final = read_frames(path), read_frames(tiny_run / "videos" / path.name)
    line = next(l for l in printed.splitlines() if l.startswith(path.name))
    lengths = [int(n) for n in re.findall(r"(?:success|failure) in (\d+) steps", line)]
    assert len(lengths) == 2 and f"{len(frames)} frames" in line
    assert len(frames) == frames_of(lengths, video.FRAME_STRIDE)
    assert np.abs(frames[:len(final)].astype(int) - final).mean() < 3  # the same episode, lossy codec aside


def _no_display_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYOPENGL_PLATFORM")}
    return {**env, **extra}


def test_eval_video_without_a_renderer_is_one_line_and_exit_2(tiny_run, tmp_path) -> None:
    """MUJOCO_GL=glfw with no display: nothing can render; one line naming the fix, exit code 2, no files."""
    out = tmp_path / "v"
    p = subprocess.run([sys.executable, "-m", "mtrl_arch.cli", "eval", str(tiny_run), "--video", str(out)],
                       env=_no_display_env(MUJOCO_GL="glfw"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: cannot render videos with MUJOCO_GL=glfw")
    assert "MUJOCO_GL=osmesa" in p.stderr and not out.exists()


def test_training_without_a_renderer_warns_once_and_finishes(backend, tmp_path, monkeypatch) -> None:
    """eval.video=true where nothing renders: one warning at the start, then the run trains, evaluates and
    saves its model as without videos."""
    monkeypatch.setattr(video, "_chosen", None)  # choose again, in this environment (restored afterwards)
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    for k in ("DISPLAY", "WAYLAND_DISPLAY", "PYOPENGL_PLATFORM"):
        monkeypatch.delenv(k, raising=False)
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning) as caught:
        assert main(["train", "mt10_quick", *TINY, "eval.video=true", "wandb.mode=disabled", f"run_dir={run_dir}"]) == 0
    warned = [str(w.message) for w in caught if "eval.video" in str(w.message)]
    assert len(warned) == 1 and warned[0].endswith("training goes on, without videos")
    assert "cannot render videos with MUJOCO_GL=glfw" in warned[0]
    assert (run_dir / "model.pt").is_file() and not (run_dir / "videos").exists()


def test_eval_video_is_refused_for_supervised_runs() -> None:
    with pytest.raises(ConfigError, match="eval.video records rollouts of RL runs"):
        load_config("multi_fashion_mnist_hps", ["eval.video=true"])
    assert load_config("mt10_quick", ["eval.video=true"]).eval.video is True


def test_unknown_camera_names_metaworlds_cameras(backend) -> None:
    with pytest.raises(ValueError, match="unknown camera 'nowhere'.*corner"):
        record_episodes(lambda o: np.zeros((len(o), 4), np.float32), "MT10", ["reach-v3"], 0, lambda t, f: None,
                        max_episode_steps=2, size=32, camera="nowhere")
