"""GLUE A/B in one process (benchmarks/results/supervised.md, "GLUE step profile"): before = the vmap block bank
(DropoutVmapBank.forward) on full-length (max_len) inputs; after = TransformerBlockBank + glue_inputs.
Usage: OMP_NUM_THREADS=1 [LIM=12] python benchmarks/glue_step_ab.py {hps|conal|eval} REPS  (ONLY=after: after only)."""
import sys
import os, time, resource, torch
torch.set_num_threads(1)
from mtrl_arch.config import load_config
from mtrl_arch.envs.supervised import make_adapter
from mtrl_arch.envs import backbones as BB
from mtrl_arch.agents.supervised import SupervisedRun
from mtrl_arch.steps import search_step, weight_step

NEW_FWD = BB.TransformerBlockBank.forward
def mode(ad, before):
    BB.TransformerBlockBank.forward = BB.DropoutVmapBank.forward if before else NEW_FWD
    ad.inputs = (lambda b: (b["x"], b["mask"])) if before else ad._new_inputs
def ru():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime, r.ru_stime, time.perf_counter()
def timed(f):
    u0, s0, w0 = ru(); f(); u1, s1, w1 = ru(); return w1 - w0, u1 - u0, s1 - s0
ov = ["data.root=/work/shared/data", "wandb.mode=disabled", "train.threads=1"]
what = sys.argv[1]; reps = int(sys.argv[2])
cfg = load_config("glue_conal" if what == "conal" else "glue_hps", ov)
ad = make_adapter(cfg); ad._new_inputs = ad.inputs
res = {}
for r in range(reps):
    for before in ((False,) if os.environ.get("ONLY") == "after" else (True, False)):
        mode(ad, before)
        torch.manual_seed(0)
        run = SupervisedRun(cfg, ad, torch.device("cpu"))
        tag = "before" if before else "after"
        if what == "eval":
            lim = int(os.environ.get("LIM", "0")); run.cfg.eval.limit_batches = lim
            out = {}
            t = timed(lambda: out.update(run.evaluate()))
            print(tag, "eval", "wall %.1f user %.1f sys %.1f" % t, {k: round(v, 5) for k, v in out.items() if k.endswith("/mean")}, flush=True)
            continue
        data = run.search_train if what == "conal" else ad.train
        it = data.batches(32, True, 0, 0)
        val = run._val_batches(32) if what == "conal" else None
        for i in range(2):
            b = next(it); vb = next(val) if val else None
            if what == "conal":
                t = timed(lambda: search_step(run.method, run.net, b, vb, run._losses, run.combiner, run.opt, i, 1.0))
            else:
                t = timed(lambda: weight_step(run.net, b, run._losses, run.combiner, run.opt, i, 1.0))
            print(tag, what, "step", i, "wall %.2f user %.2f sys %.2f" % t, flush=True)
