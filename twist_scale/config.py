"""One typed config tree for a run: every field a dataclass field with its default and documentation.

`twist_scale.config_load` reads it from TOML/YAML presets and dotted CLI overrides and validates it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from twist_scale.atomic import atomic_write_text

DATA_ROOT_ENV = "TWIST_DATA_ROOT"
DEFAULT_DATA_ROOT = "../shared/data"
DEFAULT_BUCKET_MB = 32.0  # within the 25-64 MB that DDP and ZeRO bucket by
MAX_AUTO_PROCS = 32  # tokenising processes --data.num_proc 0 starts at most: the serial read and copy dominate beyond


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and what is allowed."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    arch: Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2"] = _doc(
        "Architecture of a preset model (--model.pretrained brings its own).", "llama"
    )
    size: str = _doc("Size preset from twist_scale.models.PRESETS (tiny, small, ...).", "tiny")
    pretrained: str = _doc("Local directory or hub id to load with from_pretrained; overrides size.", "")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _doc(
        "Attention kernel: 'auto' (what transformers picks for the architecture: sdpa where it can, eager for "
        "Gemma 2's soft-capping), 'sdpa' (torch's fused attention), 'eager' (plain matmuls) or "
        "'flash_attention_2' (needs the flash-attn package and a GPU).",
        "auto",
    )


@dataclass
class DataConfig:
    root: str = _doc(
        "What '{data_root}' in file paths stands for (the presets name the sample corpora so); "
        f"default ${DATA_ROOT_ENV}, else {DEFAULT_DATA_ROOT}.",
        "",
    )
    train_files: list[str] = _doc("Training text/jsonl/parquet files.", factory=list)
    valid_files: list[str] = _doc("Validation files for periodic perplexity.", factory=list)
    hub_dataset: str = _doc("A datasets hub name used instead of train_files when online.", "")
    text_field: str = _doc("Column that holds the text in jsonl/parquet files.", "text")
    tokenizer: str = _doc("Directory with tokenizer.model; trained there on train_files if absent.", "")
    vocab_size: int = _doc("Vocabulary size when training a new tokenizer.", 4096)
    block_size: int = _doc("Tokens per training sequence (packed, no padding).", 128)
    micro_batch_size: int = _doc("Sequences per rank per step.", 8)
    cache_dir: str = _doc(
        "Token files (docs/data.md); default <out_dir>/cache. On a shared file system for multi-node runs.", ""
    )
    num_proc: int = _doc(
        f"Processes that tokenise the corpus (twist-prepare-data, or rank 0 at start-up); 0: one per core, "
        f"at most {MAX_AUTO_PROCS}.",
        0,
    )
    prepare_timeout_s: float = _doc(
        "How long ranks other than 0 wait for rank 0 to prepare the tokenizer and token files (they poll "
        "the cache, in no collective: not --parallel.timeout_s).",
        10800.0,
    )


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = _doc(
        "'adamw' or 'sgd' (sgd makes TwIST's kappa=1 limit exactly data parallel).", "adamw"
    )
    lr: float = _doc("Peak learning rate.", 3e-4)
    weight_decay: float = _doc("Decoupled weight decay.", 0.1)
    beta1: float = _doc("Adam beta1 (sgd: momentum).", 0.9)
    beta2: float = _doc("Adam beta2.", 0.95)
    eps: float = _doc("Adam epsilon.", 1e-8)
    grad_clip: float = _doc("Max global gradient norm; 0 disables clipping.", 1.0)
    warmup_steps: int = _doc("Linear warm-up steps before cosine decay.", 10)
    grad_accum_steps: int = _doc(
        "Micro-batches per optimizer step: the batch of a step is micro_batch_size x this x ranks per group. "
        "twist.local_steps and warmup count optimizer steps.",
        1,
    )


@dataclass
class ParallelConfig:
    engine: Literal["deepspeed", "fsdp", "local"] = _doc(
        "'deepspeed' (ZeRO), 'fsdp' (PyTorch FSDP2) or 'local' (plain torch, one process per group).",
        "deepspeed",
    )
    ds_config: str = _doc("DeepSpeed JSON in ds_configs/ with engine concerns only.", "ds_configs/zero1.json")
    backend: str = _doc(
        "'auto' (nccl on GPU, gloo on CPU), a torch backend ('gloo', 'nccl', or one registered with "
        "torch.distributed.Backend.register_backend), or torch's per-device form 'cpu:gloo,cuda:nccl'.",
        "auto",
    )
    timeout_s: float = _doc("A collective waiting longer than this ends the job (a crashed or stuck rank).", 300.0)
    precision: Literal["fp32", "bf16"] = _doc("'fp32' or 'bf16'.", "fp32")
    activation_checkpointing: bool = _doc(
        "Recompute each decoder layer's activations in backward instead of keeping them (less memory, ~1/3 "
        "more compute).",
        False,
    )
    compile: bool = _doc("torch.compile each decoder layer (one compilation per subnet shape).", False)


@dataclass
class TwistConfig:
    groups: int = _doc("G: data-parallel groups, each training its own subnet; must divide world size.", 1)
    kappa: float = _doc("Keep ratio in (0, 1]: fraction of attention units and MLP neurons per subnet.", 1.0)
    group_kappas: list[float] = _doc(
        "One keep ratio per group, in place of kappa: mixed kappa (e.g. 0.75,0.5 trains two deployment sizes in "
        "one run) or a sandwich (1.0,0.5: group 0 always trains the full width). Empty: every group uses kappa.",
        factory=list,
    )
    sampling: Literal["independent", "nested", "rewired"] = _doc(
        "How subnets are drawn: 'independent' (TwIST: every round a fresh draw that covers every unit), 'nested' "
        "(each block's units are sorted by weight norm at the start, and a group at kappa always trains the first "
        "ceil(kappa*n): export those with --method prefix; needs a group at 1.0, e.g. group_kappas 1.0,0.5) or "
        "'rewired' (every round the units are ranked by the central model's activation statistics and every group "
        "keeps the most important ones that still let the groups cover every unit, the rest drawn: export with "
        "--method ranked or adaptive_stats; needs correction mean and keep ratios summing to more than 1).",
        "independent",
    )
    local_steps: int = _doc("H: local steps between aggregations (the paper uses 15).", 15)
    rounds: int = _doc("Rounds of dispatch -> H steps -> aggregate; total steps = rounds * H.", 10)
    shared_layers: list[int] | None = _doc(
        "Layers kept whole in every subnet: 'auto' (the first 2 and last 2 when n_layers >= 6), "
        "'none' (partition every layer) or e.g. 0,1,4,5.",
        None,
    )
    correction: Literal["none", "scale", "mean"] = _doc(
        "Activation-shift correction: 'none', 'scale' or 'mean'.", "none"
    )
    optimizer_state: Literal["reset", "aggregate"] = _doc(
        "Optimizer moments across rounds: 'reset' or 'aggregate'.", "reset"
    )
    allow_uncovered: bool = _doc("Allow kappa*G < 1, where some units train in no group.", False)
    aggregation: Literal["packed", "dense"] = _doc(
        "How dispatch and aggregation move data: 'packed' (only the elements a group holds; bytes scale with "
        "kappa) or 'dense' (full-width masked reduce-scatter and all-gather; the reference).",
        "packed",
    )
    bucket_mb: float = _doc("Full-width MB of tensors per collective in dispatch and aggregation.", DEFAULT_BUCKET_MB)
    wire_dtype: Literal["fp32", "bf16"] = _doc(
        "Precision of the packed aggregation payload; bf16 sends each rank's change since dispatch (so small "
        "updates survive) and owners accumulate in fp32 either way.",
        "fp32",
    )
    stat_momentum: float = _doc("EMA momentum of unit activation means used by correction='mean'.", 0.99)
    distill: Literal["none", "central", "stored"] = _doc(
        "Distillation toward a teacher's logits, added to each group's loss: 'central' (the full-width central "
        "model as of the round's dispatch; one extra no-grad forward per step) or 'stored' (a pretrained "
        "teacher's top-k logits over the training data, computed once into the data cache; no teacher forward "
        "in training).",
        "none",
    )
    distill_teacher: str = _doc(
        "The stored teacher: a Hugging Face checkpoint directory or hub id sharing the run's tokenizer "
        "(default: --model.pretrained).",
        "",
    )
    distill_top_k: int = _doc("Logits the stored teacher keeps per position.", 32)
    distill_weight: float = _doc("Weight of the distillation term: loss = CE + weight * T^2 * KL.", 1.0)
    distill_temperature: float = _doc("Temperature T of both distributions in the distillation term.", 1.0)

    @property
    def kappas(self) -> tuple[float, ...]:
        """Each group's keep ratio."""
        return tuple(self.group_kappas) if self.group_kappas else (self.kappa,) * self.groups


@dataclass
class EvalConfig:
    every_rounds: int = _doc(
        "Validation perplexity every N rounds (0: only the final one, which every run ends with).", 1
    )
    max_batches: int = _doc("Validation batches per rank per evaluation.", 8)


@dataclass
class TrackingConfig:
    enabled: bool = _doc("Log to MLflow from rank 0.", True)
    uri: str = _doc("MLflow tracking URI; default sqlite:///<out_dir>/mlflow.db.", "")
    experiment: str = _doc("MLflow experiment name.", "twist-scale")
    run_name: str = _doc("MLflow run name; default the out_dir name.", "")


@dataclass
class CheckpointConfig:
    every_rounds: int = _doc("Save every N rounds (0 disables; the last round is always saved).", 1)
    keep_last: int = _doc("Keep this many newest checkpoints.", 2)
    resume: bool = _doc("Resume from the newest valid checkpoint in out_dir.", True)
    timeout_s: float = _doc(
        "How long ranks wait for each other's checkpoint writes and checksums (not --parallel.timeout_s: "
        "writing to a shared file system can take longer than any collective should).",
        1800.0,
    )


@dataclass
class RunConfig:
    out_dir: str = _doc("Run directory: resolved config, checkpoints, MLflow store, logs.", "runs/default")
    seed: int = _doc("Seed for init, data order and subnet sampling.", 0)
    on_nonfinite: Literal["stop", "skip"] = _doc(
        "A non-finite loss: 'stop' (error; the last checkpoint stays intact) or 'skip' the step.", "stop"
    )
    model: ModelConfig = _doc("Model.", factory=ModelConfig)
    data: DataConfig = _doc("Data.", factory=DataConfig)
    optim: OptimConfig = _doc("Optimizer and schedule.", factory=OptimConfig)
    parallel: ParallelConfig = _doc("Engine and precision.", factory=ParallelConfig)
    twist: TwistConfig = _doc("TwIST subnet training.", factory=TwistConfig)
    eval: EvalConfig = _doc("Validation.", factory=EvalConfig)
    tracking: TrackingConfig = _doc("MLflow.", factory=TrackingConfig)
    checkpoint: CheckpointConfig = _doc("Checkpoints.", factory=CheckpointConfig)

    @property
    def total_steps(self) -> int:
        return self.twist.rounds * self.twist.local_steps

    @property
    def tokens_per_rank_step(self) -> int:
        """Tokens one rank trains on in one optimizer step (all its accumulated micro-batches)."""
        return self.data.micro_batch_size * self.optim.grad_accum_steps * self.data.block_size

    @property
    def is_dense(self) -> bool:
        """One group training the whole model: TwIST's machinery reduces to the identity."""
        return self.twist.kappas == (1.0,)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """Flattened `section.key -> value` for MLflow params."""
    out: dict[str, str] = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        else:
            out[section] = str(values)
    return out


def save_resolved(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2))
