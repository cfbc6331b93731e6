"""A benchmark row (a ratio against its target, met or not), the targets, and the rows as a table and as JSON."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.files import write_json_atomic


@dataclass
class Row:
    name: str
    value: float
    target: float
    better: str  # "higher" | "lower"
    device: str
    command: str
    detail: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        """The value against the target, and a quality condition the row carries (time_to_student_min's STS avg)."""
        fast_enough = self.value >= self.target if self.better == "higher" else self.value <= self.target
        return fast_enough and self.detail.get("quality_met", True)


TARGETS = {  # 2026-12-02 raised teacher_encode (1.0), zero3_vs_replicated (0.8) and mfu (0.45)
    "st_training": (1.3, "higher"),
    "teacher_encode": (1.2, "higher"),
    "zero3_vs_replicated": (0.9, "higher"),
    "mfu": (0.60, "higher"),
    "loader_headroom": (20.0, "higher"),
    "ckd_overhead": (1.10, "lower"),
    "bf16_training": (1.8, "higher"),
    "time_to_student_min": (35.0, "lower"),
}
STS_AVG_GOAL = 78.5  # time_to_student_min counts only with a student at least this good


def format_table(rows: list) -> str:
    lines = ["| name | value | target | met | device |", "|---|---|---|---|---|"]
    for row in rows:
        sign = ">=" if row.better == "higher" else "<="
        lines.append(
            f"| {row.name} | {row.value:.3f} | {sign} {row.target} | {'yes' if row.met else 'NO'} | {row.device} |"
        )
    return "\n".join(lines)


def merge_json(path: Path, rows: list) -> None:
    """Write the rows into `path`, replacing earlier rows of the same name and device (other devices stay)."""
    path = Path(path)
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    new = [{k: v for k, v in asdict(r).items()} for r in rows]
    keys = {(r["name"], r["device"]) for r in new}
    write_json_atomic(path, {"rows": [r for r in old if (r["name"], r["device"]) not in keys] + new})
