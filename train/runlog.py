"""The run directory and what rank 0 reports while training.

``metrics.jsonl`` (one JSON object per logged step; a resume first drops the records
after its step, so replayed steps replace their earlier lines and each step appears
once), optional TensorBoard events in ``{out_dir}/tb`` (``pip install 'mscn[tensorboard]'``),
and a tqdm bar with images/s, loss and lr. ``config.yaml`` is train/rundir.py's. Every
method is a no-op on other ranks, so the loop can call them unconditionally; notices go
through ``tqdm.write`` so that they print above the bar, not glued to it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from mscn.config import Config
from mscn.errors import MscnError
from mscn.paths import write_atomic


class RunLog:
    def __init__(self, cfg: Config, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.out_dir = Path(cfg.train.out_dir)
        self._tb = None
        self._file = None
        self._bar = None
        self._img_s = "-"
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        damaged = trim_metrics(self.out_dir / "metrics.jsonl", start_step)
        if damaged:
            tqdm.write(f"[mscn] metrics.jsonl: dropped {damaged} damaged line(s) (a write cut short: a full "
                       "disk, a kill); the steps after the checkpoint log again")
        self._file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # require_tensorboard() checked it

            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
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
        # strict JSON: a figure with no value (images/s of the first window after a start or
        # a resume, which has no timed step) is null, not the NaN that jq and browsers refuse
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(strict, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"pretrain/{k}", v, step)
        if "images_per_s" in metrics:  # training records; monitor records (kNN) leave the bar as is
            img_s = metrics["images_per_s"]
            if img_s == img_s:  # not NaN (the first window after a start has no timed step)
                self._img_s = f"{img_s:.1f}"
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.3g}", img_s=self._img_s,
                                  refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def require_tensorboard() -> None:
    """One clear error when ``train.tensorboard=true`` cannot work (checked before training)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise MscnError("train.tensorboard=true needs the tensorboard package: pip install 'mscn[tensorboard]' "
                        "(or pip install tensorboard), or set train.tensorboard=false") from None


def _record(line: str) -> dict | None:
    """A metrics.jsonl line as its record, or None for a damaged one: a write cut short by a
    full disk or a kill leaves a partial line (or NUL bytes) at the end of the file."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return rec if isinstance(step, int) and not isinstance(step, bool) else None


def trim_metrics(path: Path, start_step: int) -> int:
    """Keep only the records up to ``start_step`` (atomically): the steps after it are
    about to be trained again and will log again. Damaged lines are dropped; returns how
    many there were."""
    if not path.is_file():
        return 0
    text = path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = [_record(ln) for ln in lines]
    kept = [ln for ln, rec in zip(lines, records) if rec is not None and rec["step"] <= start_step]
    # also when the last line lacks its newline: the next record would be glued onto it
    if len(kept) < len(lines) or (text and not text.endswith("\n")):
        write_atomic(path, "".join(ln + "\n" for ln in kept))
    return sum(rec is None for rec in records)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All readable records of ``metrics.jsonl`` (for tests, plots and the demo); a damaged
    line (a write cut short) is passed over."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [rec for line in path.read_text(errors="replace").splitlines() if (rec := _record(line)) is not None]


def last_logged(out_dir: str | Path, key: str, upto: int) -> float | None:
    """The last finite ``key`` that metrics.jsonl logged at a step <= ``upto``; None if none
    (e.g. the loss of a finished run that is run again: it trains nothing now)."""
    for rec in reversed(read_metrics(out_dir)):
        v = rec.get(key)
        if rec.get("step", upto + 1) <= upto and isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None
