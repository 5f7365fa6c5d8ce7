"""The run directory and what rank 0 reports while training.

``{out_dir}/config.yaml`` (the resolved config of this invocation), ``metrics.jsonl``
(one JSON object per logged step, appended across resumes), optional TensorBoard
events in ``{out_dir}/tb``, and a tqdm bar with images/s, loss and lr. Every method is a
no-op on other ranks, so the loop can call them unconditionally.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from mscn.config import Config, save_config


class RunLog:
    def __init__(self, cfg: Config, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.out_dir = Path(cfg.train.out_dir)
        self._tb = None
        self._file = None
        self._bar = None
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out_dir / "config.yaml")
        self._file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:
                self.notice("train.tensorboard=true but the tensorboard package is missing "
                            "(pip install tensorboard); logging JSON lines only")
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         desc="pretrain")

    def notice(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(f"[mscn] {msg}")

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, metrics: dict) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl, TensorBoard and the bar."""
        if not self.is_main:
            return
        record = {"step": step, **metrics, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"pretrain/{k}", v, step)
        if "images_per_s" in metrics:  # training records; monitor records (kNN) leave the bar as is
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.3g}",
                                  img_s=f"{metrics['images_per_s']:.1f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All records of ``metrics.jsonl`` (for tests, plots and the demo)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
