"""A rich progress bar for training: loss, accuracy and throughput live, one line per finished epoch."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RichProgress:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
                                 transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, stats="")

    def step(self, loss: float, acc: float, images_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1,
                                 stats=f"loss {loss:.3f} acc {acc:.1%} {images_per_s:.0f} img/s")

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.console.print(f"[green]✓[/] epoch {row['epoch'] + 1:>3}  loss {row['train_loss']:.3f}  "
                           f"train {row['train_acc']:.1%}  val {row['val_acc']:.1%}  val(ema) {row['val_acc_ema']:.1%}"
                           f"  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s")
