"""Rollout videos: MuJoCo's off-screen OpenGL backend, the deterministic policy's episodes, one file per task.

Backend. MuJoCo renders off-screen through EGL (a GPU driver's, or Mesa's), OSMesa (software, any
CPU machine) or GLFW (needs a display). Gymnasium's MuJoCo renderer reads ``MUJOCO_GL`` when it
creates its context, and PyOpenGL fixes its platform (``PYOPENGL_PLATFORM``) when it is first
imported, so :func:`offscreen_backend` sets both once per process before anything renders: the
user's own ``MUJOCO_GL`` if set, else EGL if it works, else OSMesa. Each candidate is tried in a
subprocess that renders a few pixels, so a missing or broken library can only fail that
subprocess, never this one; when none works, :class:`RendererUnavailable` says in one line what
to install.

Files. MP4 (H.264) through imageio's ffmpeg plugin when ``imageio-ffmpeg`` (which ships its own
ffmpeg binary; the ``video`` extra) is installed, else GIF through Pillow.

This module imports neither mujoco nor metaworld at its top: importing mujoco validates
``MUJOCO_GL``, which must be chosen first.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtrl_arch.errors import ConfigError

__all__ = ["RendererUnavailable", "offscreen_backend", "VideoWriter", "video_format", "record_videos",
           "VIDEO_SIZE", "FRAME_STRIDE", "CAMERA"]

VIDEO_SIZE = 256   # pixels, square; a multiple of 16, as H.264's macroblocks want
FRAME_STRIDE = 2   # a frame every 2nd env step: 40 fps plays Meta-World's 80 steps/s in real time
CAMERA = "corner"  # metaworld's view of the whole table (the reference's choice)

_HINTS = {
    "egl": "install the GPU driver's EGL library (Debian: `apt-get install libegl1`)",
    "osmesa": "install OSMesa (Debian: `apt-get install libosmesa6`)",
    "glfw": "GLFW needs a display; use MUJOCO_GL=egl or MUJOCO_GL=osmesa for off-screen rendering",
}
_PYOPENGL = {"egl": "egl", "osmesa": "osmesa"}  # PyOpenGL's platform for each backend (GLFW: PyOpenGL's default)

# Renders a lit red sphere at 16x16 with the backend in MUJOCO_GL and checks that red pixels came back; prints
# "ok" or the first error's one line, then leaves at once (os._exit: no finalisers, whose own errors would
# bury the first one)
_PROBE = """
import os
try:
    import mujoco
    xml = ('<mujoco><visual><global offwidth="16" offheight="16"/></visual><worldbody>'
           '<light pos="0 0 3"/><geom type="sphere" size=".5" rgba="1 0 0 1"/></worldbody></mujoco>')
    m = mujoco.MjModel.from_xml_string(xml)
    d = mujoco.MjData(m)
    mujoco.mj_forward(m, d)
    r = mujoco.Renderer(m, 16, 16)
    r.update_scene(d)
    px = r.render()
    r.close()
    print("ok" if int(px[..., 0].max()) > 100 else "rendered an empty image", flush=True)
    os._exit(0)
except BaseException as e:
    print(type(e).__name__ + (": " + str(e).splitlines()[0] if str(e).strip() else ""), flush=True)
    os._exit(1)
"""


class RendererUnavailable(ConfigError):
    """No off-screen OpenGL backend works on this machine; the message names what to install (one line)."""


_chosen: str | RendererUnavailable | None = None  # this process's outcome: a backend, or why there is none


def _probe(backend: str) -> str | None:
    """None when ``backend`` renders in a fresh process, else the reason (its last line of output)."""
    env = {**os.environ, "MUJOCO_GL": backend}
    env.pop("PYOPENGL_PLATFORM", None)
    if backend in _PYOPENGL:
        env["PYOPENGL_PLATFORM"] = _PYOPENGL[backend]
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "timed out"
    said = p.stdout.strip().splitlines()[-1:] or [f"exit code {p.returncode}" if p.returncode >= 0
                                                  else f"crashed with signal {-p.returncode}"]
    return None if said == ["ok"] else said[0][:160]


def offscreen_backend() -> str:
    """The off-screen backend of this process ('egl', 'osmesa' or 'glfw'), chosen and set up on the first call.

    ``MUJOCO_GL`` set by the user is kept (and checked); unset, EGL is taken if it renders, else OSMesa.
    Raises :class:`RendererUnavailable` (every call, once it has failed) when none renders.
    """
    global _chosen
    if _chosen is None:
        _chosen = _choose()
        if isinstance(_chosen, str):
            os.environ["MUJOCO_GL"] = _chosen
            if _chosen in _PYOPENGL:
                os.environ["PYOPENGL_PLATFORM"] = _PYOPENGL[_chosen]
    if isinstance(_chosen, RendererUnavailable):
        raise _chosen
    return _chosen


def _choose() -> str | RendererUnavailable:
    wanted = os.environ.get("MUJOCO_GL", "").strip().lower()
    if wanted:
        if wanted not in _HINTS:
            return RendererUnavailable(f"MUJOCO_GL={wanted} is not an off-screen backend; set it to egl or osmesa, "
                                       "or unset it to let mtrl-arch choose")
        platform = os.environ.get("PYOPENGL_PLATFORM", "")
        if wanted in _PYOPENGL and platform and platform.lower() != _PYOPENGL[wanted]:
            return RendererUnavailable(f"MUJOCO_GL={wanted} needs PYOPENGL_PLATFORM={_PYOPENGL[wanted]} "
                                       f"(it is {platform}); unset PYOPENGL_PLATFORM")
        why = _probe(wanted)
        if why is None:
            return wanted
        return RendererUnavailable(f"cannot render videos with MUJOCO_GL={wanted} ({why}); {_HINTS[wanted]}, "
                                   "or unset MUJOCO_GL to let mtrl-arch choose")
    reasons = {}
    for backend in ("egl", "osmesa"):
        why = _probe(backend)
        if why is None:
            return backend
        reasons[backend] = why
    return RendererUnavailable(
        f"cannot render videos: no off-screen OpenGL backend works here (EGL: {reasons['egl']}; OSMesa: "
        f"{reasons['osmesa']}); on a CPU machine {_HINTS['osmesa']}, on a GPU machine {_HINTS['egl']}")


def video_format() -> str:
    """'mp4' when imageio's ffmpeg plugin is installed (``pip install 'mtrl-arch[video]'``), else 'gif'."""
    return "mp4" if importlib.util.find_spec("imageio_ffmpeg") is not None else "gif"


class VideoWriter:
    """Frames (uint8 ``[H, W, 3]``) to ``stem.mp4`` (streamed to ffmpeg) or ``stem.gif`` (kept, then written)."""

    def __init__(self, stem: Path, fps: float, fmt: str | None = None):
        self.format = fmt or video_format()
        self.path = Path(f"{stem}.{self.format}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.n_frames = float(fps), 0
        self._frames: list[np.ndarray] = []
        self._mp4 = None
        if self.format == "mp4":
            import imageio.v2 as imageio

            # yuv420p (the default) plays everywhere, W&B's browser panel included; quality 7 of 10 keeps a
            # 500-step episode at 256x256 in a few hundred kB
            self._mp4 = imageio.get_writer(self.path, format="FFMPEG", fps=self.fps, codec="libx264", quality=7,
                                           macro_block_size=16, ffmpeg_log_level="error")
        elif self.format != "gif":
            raise ValueError(f"video format must be mp4 or gif, got {self.format!r}")

    def append(self, frame: np.ndarray) -> None:
        if self._mp4 is not None:
            self._mp4.append_data(frame)
        else:
            self._frames.append(frame)
        self.n_frames += 1

    def close(self) -> Path:
        if self._mp4 is not None:
            self._mp4.close()
        elif self._frames:
            from PIL import Image

            images = [Image.fromarray(f) for f in self._frames]
            # GIF stores delays in hundredths of a second
            images[0].save(self.path, save_all=True, append_images=images[1:], loop=0,
                           duration=max(20, int(round(100 / self.fps)) * 10))
            self._frames = []
        return self.path


def record_videos(policy: Callable[[np.ndarray], np.ndarray], benchmark: str, tasks: Sequence[str], seed: int,
                  out_dir: Path, episodes_per_task: int = 1, max_episode_steps: int | None = None,
                  benchmark_obj: Any | None = None, reward_version: str | None = None, one_hot: bool = True,
                  size: int = VIDEO_SIZE, stride: int = FRAME_STRIDE, camera: str = CAMERA,
                  fmt: str | None = None) -> dict[str, dict]:
    """Record the deterministic ``policy``'s first ``episodes_per_task`` evaluation episodes of every task.

    The episodes are :func:`~mtrl_arch.envs.metaworld.evaluate`'s first ones (same goals, same early stop
    at success), one file per task (``out_dir/TASK.mp4``, the episodes one after another), a frame
    after each reset, every ``stride``-th step and the episode's last step. Returns ``{task: {'path',
    'frames', 'episodes': [record, ...], 'caption'}}`` (records as ``evaluate``'s; the caption says how each
    episode ended). Raises
    :class:`RendererUnavailable` before anything is built when no backend renders.
    """
    offscreen_backend()  # before metaworld (hence mujoco) is imported in this process
    from .metaworld import record_episodes

    if stride < 1 or size < 16 or episodes_per_task < 1:
        raise ValueError(f"need stride >= 1, size >= 16, episodes_per_task >= 1; got {stride}, {size}, "
                         f"{episodes_per_task}")
    fps = round(80 / stride, 3)  # metaworld steps 80 times per simulated second (frame_skip 5 x 2.5 ms)
    writers = {t: VideoWriter(Path(out_dir) / t, fps, fmt) for t in tasks}
    try:
        records = record_episodes(policy, benchmark, tasks, seed, lambda t, frame: writers[t].append(frame),
                                  episodes_per_task, max_episode_steps, benchmark_obj, reward_version, one_hot,
                                  size, stride, camera)
    finally:
        paths = {t: w.close() for t, w in writers.items()}
    return {t: {"path": paths[t], "frames": writers[t].n_frames, "episodes": records[t],
                "caption": f"{t}: " + ", ".join(f"{'success' if e['success'] else 'failure'} in {e['length']} steps"
                                               for e in records[t])} for t in tasks}
