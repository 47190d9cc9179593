"""Bad inputs at start-up get one line naming the fix, before any work and with nothing written:
`--model.pretrained` (checked before any process group; a checkpoint that ships its tokenizer brings
it), groups that do not divide the launched world, a taken rendezvous port. docs/errors.md lists
every bad input and where it is tested."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import REPO, SHAKESPEARE, _shared_tokenizer
from helpers.architectures import save_tiny_checkpoint
from transformers import OPTConfig, OPTForCausalLM

from twist_scale.commands.train import main
from twist_scale.config_load import load_config
from twist_scale.tokenizer import tokenizer_directory


def train_args(out_dir, pretrained, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny_test.toml"),
        "--out_dir",
        str(out_dir),
        "--data.train_files",
        str(SHAKESPEARE),
        "--model.pretrained",
        str(pretrained),
        *extra,
    ]


def refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert message.startswith("config error: ") and "\n" not in message, message
    return message


def test_a_missing_checkpoint_directory_is_named(tmp_path):
    message = refusal(train_args(tmp_path / "run", tmp_path / "no-such-model"))
    assert "no-such-model: no such directory" in message
    assert not (tmp_path / "run").exists()


def test_an_unsupported_architecture_lists_the_supported_ones_and_the_guide(tmp_path):
    opt = tmp_path / "opt"
    OPTForCausalLM(
        OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16)
    ).save_pretrained(opt)
    message = refusal(train_args(tmp_path / "run", opt))
    assert "model type 'opt' is not supported" in message and "qwen2" in message
    assert "docs/architectures.md" in message
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(tmp_path):
    small = save_tiny_checkpoint("qwen2", tmp_path / "qwen2", vocab_size=64)
    message = refusal(train_args(tmp_path / "run", small))  # the run would train a 512-token tokenizer
    assert "--data.vocab_size (the tokenizer this run trains) has 512 tokens" in message and "only 64" in message
    message = refusal(train_args(tmp_path / "run", small, "--data.tokenizer", str(_shared_tokenizer())))
    assert f"the tokenizer in {_shared_tokenizer()} has 512 tokens" in message
    assert not (tmp_path / "run").exists()


def test_a_checkpoints_own_tokenizer_is_used_unless_data_tokenizer_says_otherwise(tmp_path):
    checkpoint = save_tiny_checkpoint("mistral", tmp_path / "mistral", vocab_size=512)
    plain = load_config(train_args(tmp_path / "run", checkpoint))
    assert tokenizer_directory(plain) == tmp_path / "run" / "tokenizer"  # none shipped: the run trains one
    for file in _shared_tokenizer().iterdir():
        if file.is_file():
            shutil.copy(file, checkpoint)
    assert tokenizer_directory(plain) == checkpoint
    chosen = load_config(train_args(tmp_path / "run", checkpoint, "--data.tokenizer", str(tmp_path / "mine")))
    assert tokenizer_directory(chosen) == tmp_path / "mine"


def test_groups_not_dividing_the_launched_world_are_refused_before_any_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = refusal(["--config", str(REPO / "configs" / "tiny_test.toml"), "--twist.groups", "3"])
    assert "--twist.groups 3 does not divide the world size 2" in message


@pytest.mark.slow  # 8 s: a real deepspeed launcher on a taken port
def test_a_taken_master_port_names_the_launcher_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args = ["--config", str(REPO / "configs" / "tiny_test.toml"), "--out_dir", str(tmp_path / "run")]
        proc = subprocess.run(
            [sys.executable, str(REPO / "launch" / "train.py"), *args, "--parallel.engine", "local"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"config error: port {port} on 127.0.0.1 is taken (another run?): give the launcher another one with "
        "--master_port"
    )
    assert "Traceback" not in proc.stderr
