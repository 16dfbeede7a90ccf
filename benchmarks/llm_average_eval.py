"""Greedy held-out accuracy of weight averages built from a run's recorded adapters (`llm_record_adapters.py`).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_average_eval.py runs/h3 \
        live,ema0.9,ema0.95,ema0.98,emaw0.98,emaw0.99,tail30

Schemes: `live` (the last update's adapters), `emaD` (the moving average with decay D from the initial adapters,
what `--ema-decay D` keeps; ema0.95 is checked against the checkpoint's), `emawD` (the same with decay
min(D, (1 + t) / (10 + t)), so the untrained start does not weigh in), `tailK` (the plain mean of the last K
updates). Each is evaluated greedily on the 500 held-out problems, as `ponglab eval` does.
"""
import json, sys, dataclasses
from pathlib import Path
import torch
from agents.cli import from_dict
from agents.builders import ALGOS, build_agent, make_env_fn
from agents.checkpoint import load_checkpoint
from agents.trainer import evaluate
from agents.common import seed_everything, resolve_device
from games import resolve
run = Path(sys.argv[1]); schemes = sys.argv[2].split(",")
upto = int(sys.argv[3]) if len(sys.argv) > 3 else None  # use the first `upto` updates only
saved = json.loads((run / "config.json").read_text())
spec = resolve(saved["game"])
args = from_dict(ALGOS["ppo"].args_for(spec.kind), saved["args"])
a = dataclasses.replace(args, lm=dataclasses.replace(args.lm, ema_decay=0.0))
tc = a.train
seed_everything(tc.seed)  # as `train` does, so the adapters' initial values are the run's
env = make_env_fn(spec, a)(tc.num_envs, tc.seed)
agent = build_agent("ppo", spec, a, env, torch.device("cpu"))
init = [p.detach().clone() for p in agent.lm_params]
traj = torch.load(f"{str(run).rstrip('/')}.adapters.pt")
snaps = traj["snaps"][:upto] if upto else traj["snaps"]
print(run, "updates", len(snaps), flush=True)
def ema(d):
    e = [x.clone() for x in init]
    for s in snaps:
        for ei, si in zip(e, s): ei.lerp_(si, 1 - d)
    return e
def emaw(d):  # decay min(d, (1 + t) / (10 + t)): no pull toward the initial weights early on
    e = [x.clone() for x in init]
    for t, s in enumerate(snaps):
        dt = min(d, (1 + t) / (10 + t))
        for ei, si in zip(e, s): ei.lerp_(si, 1 - dt)
    return e
def tail(k):
    return [torch.stack([s[i] for s in snaps[-k:]]).mean(0) for i in range(len(init))]
ck = load_checkpoint(run)["agent"]
if not upto:
    e95 = ema(0.95)
    print("offline ema0.95 vs checkpoint ema: max diff", max(float((x - y).abs().max()) for x, y in zip(e95, ck["ema"])), flush=True)
env_eval = make_env_fn(spec, a, split="test")
for sch in schemes:
    w = snaps[-1] if sch == "live" else emaw(float(sch[4:])) if sch.startswith("emaw") else ema(float(sch[3:])) if sch.startswith("ema") else tail(int(sch[4:]))
    with torch.no_grad():
        for p, x in zip(agent.lm_params, w): p.copy_(x)
    seed_everything(12345)
    ev = env_eval(100, 12345)
    r = evaluate(agent, ev, 500)
    print(run, sch, r["return_mean"], flush=True)
