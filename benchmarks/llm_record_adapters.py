"""Run the default LM command while recording the live adapters after every update, for `llm_average_eval.py`.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm_record_adapters.py runs/h3 2 [more ponglab flags]

Argument 1 is the run folder, argument 2 the seed; anything after goes to `ponglab train ppo addition` as is (e.g.
`--train-minutes 30 --steps 204800`). The record, a list of the adapters after each update, is written to
RUN_DIR.adapters.pt (19.6 MB per update with rank-16 LoRA on SmolLM2). Recording changes nothing in training.
"""
import sys, time, torch
from agents.cli import main
import llm_bridge.agent as A
run, seed = sys.argv[1], sys.argv[2]
snaps, times = [], []
orig = A.LMAgent.update
t0 = [None]
def update(self, global_step, total_steps):
    m = orig(self, global_step, total_steps)
    snaps.append([p.detach().clone() for p in self.lm_params]); times.append(global_step)
    return m
A.LMAgent.update = update
try:
    main(["train", "ppo", "addition", "--run-dir", run, "--seed", seed, "--no-progress", *sys.argv[3:]])
finally:
    torch.save({"snaps": snaps, "steps": times}, f"{run.rstrip('/')}.adapters.pt")
