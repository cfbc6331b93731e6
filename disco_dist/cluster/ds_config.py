"""DeepSpeed configs, for the student engine and the teacher alike: read one, refuse unknown keys, set precision.

DeepSpeed ignores a top-level key it does not know, so a typo such as "zero_optimisation" would silently
train without ZeRO; `load_ds_config` refuses it in one line instead.
"""

import json
from pathlib import Path

from ..core.errors import UserError
from . import distributed


def load_ds_config(path, micro_batch_size: int | None = None, bf16: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; see ds_configs/ for the shipped ones")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({err})") from None
    check_ds_config_keys(config, path)
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_accumulation_steps"] = 1
        config.pop("train_batch_size", None)  # derived from the two above and the world size
    config.setdefault("train_micro_batch_size_per_gpu", 1)  # required even for inference
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    return config


# DeepSpeed's documented top-level sections.
DS_TOP_LEVEL_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "fp16",
    "bf16",
    "amp",
    "torch_autocast",
    "gradient_clipping",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "steps_per_print",
    "wall_clock_breakdown",
    "dump_state",
    "memory_breakdown",
    "flops_profiler",
    "activation_checkpointing",
    "sparse_attention",
    "data_efficiency",
    "curriculum_learning",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "elasticity",
    "aio",
    "autotuning",
    "compression_training",
    "checkpoint",
    "data_types",
    "pipeline",
    "dataloader_drop_last",
    "compile",
    "hybrid_engine",
    "weight_quantization",
    "nebula",
    "eigenvalue",
    "progressive_layer_drop",
    "quantize_training",
    "timers",
    "disable_allgather",
    "gradient_allreduce_op",
    "seq_parallel_communication_data_type",
    "use_data_before_expert_parallelism",
    "graph_harvesting",
    "tensor_parallel",
    "zero_allow_comm_data_type_fp32",
    "bf16_master_weights_and_grads",
    "bf16_optimizer_states",
    "fp16_master_weights_and_grads",
}


def check_ds_config_keys(config: dict, path) -> None:
    """Unknown top-level keys (keys starting with "_" are comments) and bad `zero_optimization` keys or
    values, named in one line."""
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    unknown = sorted(k for k in config if k not in DS_TOP_LEVEL_KEYS and not k.startswith("_"))
    if unknown:
        raise UserError(
            f"DeepSpeed config {path}: unknown key(s) {', '.join(unknown)}; DeepSpeed would ignore "
            "them silently (see https://www.deepspeed.ai/docs/config-json/)"
        )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"DeepSpeed config {path}: zero_optimization must be an object")
    from pydantic import ValidationError

    distributed.import_deepspeed()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"DeepSpeed config {path}: zero_optimization.{where}: {first['msg']}") from None
