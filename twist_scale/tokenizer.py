"""A run's tokenizer: which one it uses, training one where there is none, and loading it checked.

Apart from the token files because more than data preparation asks for it: checking a pretrained
model's vocabulary (`run_model.py`) reads the run's tokenizer without preparing any data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from twist_scale.config import DataConfig, RunConfig
from twist_scale.startup import local_directory

log = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", SPM_FILE)  # any of them: a tokenizer is there


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in TOKENIZER_FILES)


def train_tokenizer(files: list[str], directory: Path, vocab_size: int) -> None:
    """Byte-fallback BPE with identity normalisation, so decode(encode(text)) == text."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    tmp_prefix = directory / "tokenizer.tmp"
    spm.SentencePieceTrainer.train(
        input=",".join(files),
        model_prefix=str(tmp_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)  # first: waiting ranks hash the dir once the model is in
    Path(f"{tmp_prefix}.model").replace(directory / SPM_FILE)  # atomic: readers never see half a model


def load_tokenizer(directory: Path, sample_text: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory; a bare tokenizer.model goes through LlamaTokenizer.

    AutoTokenizer on a directory holding only the .model file gives different ids.
    """
    if (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(directory)
    elif (directory / SPM_FILE).exists():
        tok = LlamaTokenizer.from_pretrained(directory, add_bos_token=False)
    else:
        raise FileNotFoundError(f"no tokenizer in {directory}: expected {SPM_FILE} or tokenizer.json")
    ids = tok(sample_text, add_special_tokens=False)["input_ids"]
    if not ids or tok.decode(ids) != sample_text:
        raise RuntimeError(
            f"tokenizer in {directory} fails an encode/decode round trip on the training text "
            f"({len(ids)} ids); it would train on garbage. Retrain it (delete {directory}) or fix it."
        )
    return tok


def pretrained_tokenizer(pretrained: str) -> Path | None:
    """The tokenizer a pretrained checkpoint (directory or hub id) ships with, if it has one."""
    directory = local_directory(pretrained, ["tokenizer*", SPM_FILE, "special_tokens_map.json"])
    return directory if has_tokenizer(directory) else None


def tokenizer_directory(run: RunConfig) -> Path:
    """--data.tokenizer, else the pretrained checkpoint's own tokenizer, else `<out_dir>/tokenizer` (trained)."""
    if run.data.tokenizer:
        return Path(run.data.tokenizer)
    own = pretrained_tokenizer(run.model.pretrained) if run.model.pretrained else None
    return own or Path(run.out_dir) / "tokenizer"


def prepare_tokenizer(cfg: DataConfig, directory: Path) -> Path:
    """The tokenizer directory; trains one there when none exists (one process: rank 0 or twist-prepare-data)."""
    if not has_tokenizer(directory):  # never into a checkpoint's directory: it has one
        if not cfg.train_files:
            raise ValueError("cannot train a tokenizer without --data.train_files; pass --data.tokenizer DIR")
        log.info("training a %d-token BPE tokenizer on %s", cfg.vocab_size, cfg.train_files)
        train_tokenizer(cfg.train_files, directory, cfg.vocab_size)
    return directory


def sample_text(cfg: DataConfig) -> str:
    """What a tokenizer must round-trip: the first line of the training text."""
    return sample_line(cfg.train_files) if cfg.train_files else "a b"


def sample_line(files: list[str]) -> str:
    with open(files[0], encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return line.strip()
    raise ValueError(f"{files[0]} holds no text")
