"""How many problems with signal did a language-model run learn from, and what did it end at?

    python benchmarks/llm_signal_count.py runs/k1 runs/q7 ...

A group baseline learns only from a group whose samples scored differently ("mixed"); an all-same group has
advantage 0 and no gradient. Each update logs the share of all-same groups over the batches it sampled
(`charts/frac_zero_std_groups`) and how many batches that was (`charts/sample_batches`), and every batch asks
num_envs / group_size prompts (the run's `config.json`; `--grow-group-size` keeps that number), so the mixed
groups of a run are the sum over its updates of (1 - share) x prompts x batches. Printed per run, by training
seconds, beside its final held-out accuracy (`summary.json`), then the correlation over the runs given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WINDOWS = (0, 300, 600, 905)  # training seconds


def count(run: Path) -> tuple[list[float], int, float]:
    """(mixed groups per window of WINDOWS, updates, final accuracy) of one run folder."""
    train = json.loads((run / "config.json").read_text())["args"]["train"]
    lm = json.loads((run / "config.json").read_text())["args"]["lm"]
    prompts = train["num_envs"] // lm["group_size"]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    same = {e.step: e.value for e in events.Scalars("charts/frac_zero_std_groups")}
    batches = {e.step: e.value for e in events.Scalars("charts/sample_batches")}
    seconds = {e.step: e.value for e in events.Scalars("charts/train_seconds")}
    mixed = [0.0] * (len(WINDOWS) - 1)
    for step, share in same.items():
        window = np.searchsorted(WINDOWS, seconds[step], side="right") - 1
        mixed[min(window, len(mixed) - 1)] += (1 - share) * prompts * batches[step]
    final = json.loads((run / "summary.json").read_text())["final_eval_accuracy"]
    return mixed, len(same), final


def main(runs: list[str]) -> None:
    heads = " / ".join(f"{a}-{b} s" for a, b in zip(WINDOWS, WINDOWS[1:]))
    print(f"| run | mixed groups ({heads}) | all | updates | final accuracy |")
    print("|---|---|---:|---:|---:|")
    totals, finals = [], []
    for run in runs:
        mixed, updates, final = count(Path(run))
        totals.append(sum(mixed))
        finals.append(final)
        print(f"| {run} | {' / '.join(f'{m:.0f}' for m in mixed)} | {sum(mixed):.0f} | {updates} | {final:.1%} |")
    if len(runs) > 2:
        print(f"correlation of all mixed groups with the final accuracy over {len(runs)} runs: "
              f"{np.corrcoef(totals, finals)[0, 1]:.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/llm_signal_count.py RUN_DIR [RUN_DIR ...] (runs of `ponglab train ppo` "
                 "on a text game with advantage=group and --min-informative)")
    main(sys.argv[1:])
