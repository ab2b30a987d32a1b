"""Metric logging: one CSV per split (always) and TensorBoard (when tensorboardX is installed)."""
import csv
import os


class MetricsWriter:
  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._columns: dict[str, list[str]] = {}
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir)
    except ImportError:  # TensorBoard logging is optional; the CSVs are the record.
      self._tb = None

  def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
    path = os.path.join(self.logdir, f"{split}_metrics.csv")
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    if split not in self._columns:
      if os.path.exists(path):  # a resumed run appends under the header it wrote before
        with open(path) as f:
          self._columns[split] = next(csv.reader(f), None) or []
      if not self._columns.get(split):
        self._columns[split] = list(row)
        with open(path, "w", newline="") as f:
          csv.writer(f).writerow(self._columns[split])
    new_columns = [k for k in row if k not in self._columns[split]]
    if new_columns:  # a metric appeared later (or a resumed run logs more): widen the file
      with open(path, newline="") as f:
        old_rows = list(csv.DictReader(f))
      self._columns[split] += new_columns
      with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, self._columns[split])
        writer.writeheader()
        writer.writerows(old_rows)
    with open(path, "a", newline="") as f:
      csv.DictWriter(f, self._columns[split]).writerow(row)
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
