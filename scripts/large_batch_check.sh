#!/usr/bin/env bash
# Does S2 lose quality with a large global batch? CKD on the same teacher-cached sentences at global batch 128
# (the S2 recipe: lr 2e-4) and 1,024 (lr scaled by sqrt(8) and by 8), the same epochs, queue and head, each scored
# on the seven STS tasks; prints a table. The GPU recipe (recipes/S2-gpu.json) takes its learning rate from this.
#   bash scripts/large_batch_check.sh                 # 20,000 sentences, 2 epochs, 2 CPU ranks (~45 min on 2 cores)
#   SENTENCES=50000 EPOCHS=1 RUN=runs/lb50k bash scripts/large_batch_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
SENTENCES=${SENTENCES:-20000} EPOCHS=${EPOCHS:-2} RANKS=${RANKS:-2} R=${RUN:-runs/lb20k}
DS="deepspeed --num_gpus $RANKS --master_port ${MASTER_PORT:-47119} --module --no_local_rank disco_dist.cli.commands"
per_rank() { echo $(($1 / RANKS)); }
[ -f "$R/shards/index.json" ] || python -m disco_dist.cli.commands make_shards --out "$R/shards" --limit "$SENTENCES" \
  --shard-size 1000 --overwrite
[ -f "$R/shards-teacher/index.json" ] || OMP_NUM_THREADS=1 $DS cache_teacher --shards "$R/shards" \
  --out "$R/shards-teacher" --teacher all-mpnet-base-v2 --teacher-replicated --teacher-token-budget 0 --overwrite
common=(--shards "$R/shards-teacher" --student all-MiniLM-L6-v2 --keep-layers 0 2 5 --loss ckd --epochs "$EPOCHS"
  --head linear --head-init lstsq --logit-scale 20 --queue-size 65536 --select best --resume auto)
run() {  # name, global batch, lr, eval every
  [ -f "$R/$1/train_summary.json" ] || OMP_NUM_THREADS=1 $DS distill "${common[@]}" --run-dir "$R/$1" \
    --batch-size "$(per_rank "$2")" --lr "$3" --eval-every "$4" --checkpoint-every 100 --log-every "$4"
  [ -f "$R/$1/scores.json" ] || python -m disco_dist.cli.commands evaluate "$R/$1/final" --out "$R/$1/scores.json" \
    --label "$1" --batch-size 128
}
run b1024-sqrt 1024 5.66e-4 5
run b128 128 2e-4 40
run b1024-linear 1024 1.6e-3 5
python - "$R" <<'EOF'
import json, sys
from pathlib import Path

root = Path(sys.argv[1])
print(f"{'run':<14} {'steps':>6} {'lr':>8} {'dev best':>9} {'7-task avg':>11} {'minutes':>8}")
for name in ("b128", "b1024-sqrt", "b1024-linear"):
    summary = json.loads((root / name / "train_summary.json").read_text())
    config = json.loads((root / name / "config.json").read_text())
    scores = json.loads((root / name / "scores.json").read_text())["scores"]
    print(f"{name:<14} {summary['steps']:>6} {config['lr']:>8} {summary['best_dev']:>9.2f} {scores['avg']:>11.2f} "
          f"{summary['seconds'] / 60:>8.1f}")
EOF
