"""The benchmark's whole-run parts: S2 training in bf16 against fp32 (speed and STS-B dev after the same steps),
and minutes from nothing to a scored student (`demo.py --recipe S2-fast`). Mixed into `Benchmark`."""

import json
from pathlib import Path

import torch

from ..core.errors import UserError
from ..report.recipes import flags
from .benchmark_rows import STS_AVG_GOAL


class WholeRuns:
    def bf16_training(self) -> None:
        """S2 CKD (the recipe's settings) on 2 ranks, fp32 then bf16 (autocast, fp32 weights), on the same
        batches: sentences/s after the warm-up, and the STS-B dev score after the same steps."""
        if not self.s.bf16_shards:  # the benchmark's own 768 sentences would be 33 epochs: a meaningless dev score
            raise UserError(
                "bf16_training needs --bf16-shards: teacher-cached shards of at least 2 x 64 x --bf16-steps sentences "
                "(e.g. runs/fast/shards-teacher from `python launchers/demo.py --recipe S2-fast --run-dir runs/fast`)"
            )
        shards = Path(self.s.bf16_shards)
        warmup = self.s.warmup_steps
        common = flags(
            dict(
                keep_layers=list(self.s.bf16_keep_layers),
                lr=2e-4,
                head_init="lstsq",
                eval_every=self.s.bf16_steps,  # one STS-B dev score, at the end
                select="best",
            )
        )

        def side(precision):
            rate, summary = self._distill_run(
                shards, "ckd", self.s.bf16_steps - warmup, warmup, ranks=2, extra=[*common, "--precision", precision]
            )
            return {"rate": rate, "dev": summary["best_dev"]}

        fp32, bf16 = side("fp32"), side("bf16")
        from ..models.precision import matmul_gflops

        self._add(
            "bf16_training",
            bf16["rate"] / fp32["rate"],
            self.s.command,
            fp32_sentences_per_s=round(fp32["rate"], 2),
            bf16_sentences_per_s=round(bf16["rate"], 2),
            fp32_stsb_dev=round(fp32["dev"], 2),
            bf16_stsb_dev=round(bf16["dev"], 2),
            dev_gap=round(bf16["dev"] - fp32["dev"], 2),
            steps=self.s.bf16_steps,
            ranks=2,
            shards=str(shards),
            precision_probe_gflops={  # what --precision auto measures, at this process's thread count
                "fp32": round(matmul_gflops(torch.float32), 1),
                "bf16": round(matmul_gflops(torch.bfloat16), 1),
                "threads": torch.get_num_threads(),
            },
        )

    def time_to_student_min(self) -> None:
        """Read a finished `python launchers/demo.py --recipe S2-fast --run-dir D` (launchers/benchmark.py runs one
        first when no run is given): its minutes from shards to the seven-task table, and the table's average."""
        run_dir = Path(self.s.time_to_student_run)
        if not (run_dir / "timing.json").is_file() or not (run_dir / "finetune" / "eval_sts.json").is_file():
            raise UserError(
                f"--time-to-student-run {run_dir}: not a finished `demo.py --recipe S2-fast` run (no timing.json or "
                "finetune/eval_sts.json); leave the flag out to run one"
            )
        timing = json.loads((run_dir / "timing.json").read_text())
        scores = json.loads((run_dir / "finetune" / "eval_sts.json").read_text())["scores"]
        average = scores["avg"]
        self._add(
            "time_to_student_min",
            timing["to_student"] / 60,
            f"python launchers/demo.py --recipe S2-fast --run-dir {run_dir}",
            sts_avg=round(average, 2),
            sts_avg_goal=STS_AVG_GOAL,
            quality_met=average >= STS_AVG_GOAL,
            minutes={step: round(seconds / 60, 2) for step, seconds in timing["seconds"].items()},
        )
