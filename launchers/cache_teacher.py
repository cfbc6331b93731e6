"""Embed every sentence of a shard folder with the teacher once (ZeRO-3 across the ranks) and write new
shards holding the sentences with their fp16 teacher embeddings; `distill.py` then skips the teacher.

    deepspeed --num_gpus 2 launchers/cache_teacher.py --shards runs/shards --out runs/shards-mpnet
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from disco_dist import distributed  # noqa: E402
from disco_dist.distributed import exit_process  # noqa: E402
from disco_dist.config import DS_CONFIGS, Parser  # noqa: E402
from disco_dist.errors import exit_on_user_error  # noqa: E402
from disco_dist.shards import read_index  # noqa: E402
from disco_dist.teacher import ZeroTeacher, cache_teacher_embeddings, load_ds_config  # noqa: E402


@exit_on_user_error
def main(argv=None):
    parser = Parser(prog="cache_teacher.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="shard folder made by make_shards.py")
    parser.add_argument("--out", type=Path, required=True, help="new shard folder to write")
    parser.add_argument("--teacher", default="all-mpnet-base-v2", help="folder, fetched name or hub id")
    parser.add_argument("--teacher-ds-config", type=Path, default=DS_CONFIGS / "teacher_zero3.json")
    parser.add_argument("--teacher-batch-size", type=int,
                        help="sentences per teacher forward (default: 256 on a GPU; on a CPU 64 with several ranks, 16 with one)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="teacher forward precision; auto: bf16 on a GPU that has it, else fp32 (bf16 also helps "
                        "CPUs with AVX512-BF16/AMX); embeddings are stored as fp16 either way")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    read_index(args.shards)  # a bad folder or config fails here, before any rank loads the teacher
    load_ds_config(args.teacher_ds_config)
    env = distributed.init_distributed(args.local_rank)
    teacher = ZeroTeacher(args.teacher, args.teacher_ds_config, env.device, args.teacher_batch_size, args.max_length,
                          precision=args.precision)
    cache_teacher_embeddings(teacher, args.shards, args.out, env, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
    exit_process(0)  # done and on disk: skip the interpreter teardown (see disco_dist.distributed.exit_process)
