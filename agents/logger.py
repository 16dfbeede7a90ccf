"""The one logger: every metric goes through `Logger.record`, and `dump` writes it to TensorBoard."""

from __future__ import annotations

from typing import Any

from torch.utils.tensorboard import SummaryWriter


class Logger:
    """Collects scalars and text for a step, then writes them to the run's TensorBoard event file.

    Tags use fixed prefixes so runs line up in TensorBoard: `charts/` (returns, SPS, learning rate, epsilon),
    `losses/` (everything an update optimises or monitors), `eval/` (periodic evaluations).
    """

    def __init__(self, run_dir: str, purge_step: int | None = None):
        self.writer = SummaryWriter(run_dir, purge_step=purge_step)
        self._pending: dict[str, Any] = {}

    def record(self, key: str, value: Any) -> None:
        self._pending[key] = value

    def dump(self, step: int) -> None:
        for key, value in self._pending.items():
            if isinstance(value, str):
                self.writer.add_text(key, value, step)
            elif value is not None:
                self.writer.add_scalar(key, float(value), step)
        self._pending.clear()

    def hparams(self, table: dict[str, Any]) -> None:
        """The full configuration as a markdown table in TensorBoard's text tab."""
        rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(table.items()))
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}", 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
