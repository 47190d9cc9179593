"""Every supported architecture, from a tiny random checkpoint saved by transformers' own config class:
the sliced subnet equals the masked full model, a uniform export is a plain checkpoint of its
architecture, an adaptive-width export loads where twist-scale cannot be imported, and pretrained
start-up on the meta device fills what from_pretrained loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers.architectures import save_tiny_checkpoint, tiny_checkpoint
from helpers.models import VOCAB, oracle_logits, word_tokenizer
from transformers import AutoModelForCausalLM

from twist_scale.models import ARCHITECTURES, architecture_of, build_model
from twist_scale.pruning.build import build_subnet
from twist_scale.pruning.format import REMOTE_LOADER, SUBNET_FILE, save_exported
from twist_scale.startup import fill
from twist_scale.subnet import SubnetSampler, partitioned_blocks

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))

# Runs in a subprocess whose imports cannot reach twist_scale: the export's own files must suffice.
LOAD_WITHOUT_TWIST_SCALE = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "twist_scale":
            raise ImportError(name + " is not installed here")
sys.meta_path.insert(0, NotInstalled())
try:
    import twist_scale
    sys.exit("twist_scale is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
ids, logits = torch.load(sys.argv[1]), {}
for directory in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits[directory] = model(input_ids=ids).logits
torch.save(logits, sys.argv[2])
"""


def test_every_architecture_is_supported():
    assert set(ARCHITECTURES) == {*DECODERS, "gpt2"}


def kappa_half(model: torch.nn.Module, shared: list[int] = ()):
    groups = partitioned_blocks(architecture_of(model).unit_blocks(model.config), list(shared))
    return groups, SubnetSampler(tuple(groups), (0.5,), seed=1).specs(0)[0]


@pytest.mark.parametrize("model_type", [*DECODERS, "gpt2"])
def test_the_sliced_subnet_gives_the_masked_full_models_logits(model_type):
    model = tiny_checkpoint(model_type, VOCAB)
    groups, spec = kappa_half(model)
    sub, _ = build_subnet(model, spec, "none")
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        sliced = sub(input_ids=IDS).logits
    torch.testing.assert_close(sliced, oracle_logits(model, groups, spec, "none", {}, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", DECODERS)
def test_a_uniform_export_is_a_plain_checkpoint_of_its_architecture(model_type, tmp_path):
    model = tiny_checkpoint(model_type, VOCAB)
    _, spec = kappa_half(model)
    sub, plain = build_subnet(model, spec, "scale")
    assert plain
    path = save_exported(tmp_path / "uniform", sub, word_tokenizer(), plain, {"kappa": 0.5})
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(loaded) is type(model) and loaded.config.num_key_value_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, sub(input_ids=IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.slow  # 7 s: eight exports loaded in a subprocess without twist_scale
def test_adaptive_exports_load_with_transformers_alone(tmp_path):
    """Per-layer widths (layer 0 kept whole) and the 'mean' correction's folded biases, which only
    Llama's config can state: every architecture's export loads through its remote code."""
    exports, expected = [], {}
    for model_type in [*DECODERS, "gpt2"]:
        model = tiny_checkpoint(model_type, VOCAB)
        groups, spec = kappa_half(model, shared=[0])
        means = {g.output_module: torch.randn(g.num_units * g.output_axis.unit_width) for g in groups}
        sub, plain = build_subnet(model, spec, "mean", means)
        path = save_exported(tmp_path / model_type, sub, word_tokenizer(), plain, {"kappa": 0.5})
        assert not plain and f'"loader": "{REMOTE_LOADER}"' in (path / SUBNET_FILE).read_text()
        with torch.no_grad():
            expected[str(path)] = sub(input_ids=IDS).logits
        exports.append(str(path))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(exports[0])
    torch.save(IDS, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_TWIST_SCALE, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
        + exports,
        check=True,
        cwd=tmp_path,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    loaded = torch.load(tmp_path / "out.pt")
    for path, logits in expected.items():
        torch.testing.assert_close(loaded[path], logits, rtol=0, atol=1e-5, msg=path)


@pytest.mark.parametrize("model_type", [*DECODERS, "gpt2"])
def test_pretrained_start_up_fills_what_from_pretrained_loads(model_type, tmp_path):
    directory = save_tiny_checkpoint(model_type, tmp_path / "base", VOCAB)
    with torch.device("meta"):
        model = build_model("", "", VOCAB, str(directory), weights=False)
    fill(model, seed=3, pretrained=str(directory))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    expected = reference.state_dict() | dict(reference.named_buffers())
    filled = model.state_dict() | dict(model.named_buffers())
    assert filled.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(filled[name], value), name
