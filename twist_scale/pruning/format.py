"""The export format: a dense checkpoint, its tokenizer, `twist_subnet.json` and a README, and its loader.

Every export loads with `AutoModelForCausalLM.from_pretrained(dir)`, with or without twist-scale:
- *plain*: the architecture's own config states every width (uniform widths), so any tool that takes
  the architecture takes the export;
- *remote code*: per-layer widths (shared layers kept whole, adaptive methods), a GPT-2 head count,
  or a bias the config has no flag for. config.json keeps a width the architecture can state,
  lists the parameters it cannot (`twist_shapes`) and points `auto_map` at two files written beside
  it: `modeling_twist.py` (the architecture's classes, resized after construction) and
  `twist_widths.py` (a copy of `twist_scale.models.widths`). It loads with `trust_remote_code=True`,
  the standard Hugging Face mechanism for architectures transformers lacks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from twist_scale.atomic import atomic_directory
from twist_scale.models import widths
from twist_scale.pruning.build import parameter_count, unstated_shapes

SUBNET_FILE = "twist_subnet.json"
MODELING_FILE = "modeling_twist.py"
PLAIN_LOADER = "AutoModelForCausalLM.from_pretrained(dir)"
REMOTE_LOADER = "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"

MODELING = '''"""A {model_class} with per-layer widths, exported by twist-scale: built at the widths its config
states, then the parameters listed in config.twist_shapes are resized (see twist_widths.py)."""

from transformers import {config_class}, {model_class}

from .twist_widths import resize


class TwistConfig({config_class}):
    model_type = "{model_type}"


class TwistForCausalLM({model_class}):
    config_class = TwistConfig

    def __init__(self, config):
        super().__init__(config)
        resize(self, config.twist_shapes)
'''

README = """# TwIST subnet export

The κ={kappa:g} subnet of `{source}` as a dense model: {parameters:,} parameters, pruning method
`{method}` (seed {seed}), activation-shift correction `{correction}` folded into the weights.

Load it with (twist-scale need not be installed):

```python
from transformers import AutoModelForCausalLM
model = {load}
```

{why}

`twist_subnet.json` records the per-layer widths and which units of the central model were kept.
"""
PLAIN_WHY = (
    "Every layer has the same width, so config.json states it: any tool that takes a `{arch}` checkpoint "
    "(transformers; vLLM, TGI and llama.cpp's converter read the same config) takes this one."
)
REMOTE_WHY = (
    "Its widths are not expressible in a `{arch}` config (per-layer widths, or a bias the config has no flag "
    "for), so config.json lists the resized parameters and `{modeling}` builds them: tools that run Hugging "
    "Face remote code (transformers with `trust_remote_code=True`, and servers that load models through it) "
    "take it. Servers with their own kernels per architecture need uniform widths: export a uniform method "
    "(`random`, `magnitude`, `wanda_sp`, `taylor`) with `--shared_layers none` for them."
)


def save_exported(
    directory: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, plain: bool, record: dict
) -> Path:
    """Checkpoint (+ remote code unless plain) + tokenizer + twist_subnet.json + README.md, written aside
    and renamed (never half a model)."""
    directory = Path(directory)
    arch = model.config.model_type
    record = {"loader": PLAIN_LOADER if plain else REMOTE_LOADER, "parameters": parameter_count(model), **record}
    fields = {"source": "?", "method": "?", "seed": 0, "correction": "none"} | record
    why = (PLAIN_WHY if plain else REMOTE_WHY).format(arch=arch, modeling=MODELING_FILE)
    load = record["loader"].replace("(dir", f'("{directory}"')
    with atomic_directory(directory) as tmp:
        if plain:
            model.save_pretrained(tmp)
        else:
            _save_with_remote_code(tmp, model)
        tokenizer.save_pretrained(tmp)
        (tmp / SUBNET_FILE).write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(README.format(load=load, why=why, **fields))
    return directory


def _save_with_remote_code(directory: Path, model: nn.Module) -> None:
    """The checkpoint, with config.json naming the resized parameters and the classes that build them."""
    config = model.config
    config.twist_shapes = unstated_shapes(model)
    config.auto_map = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.TwistConfig",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.TwistForCausalLM",
    }
    model_type = f"twist_{config.model_type}"  # not a transformers type: plain loading asks for remote code
    model.save_pretrained(directory)
    config_file = directory / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"model_type": model_type}, indent=2))
    (directory / MODELING_FILE).write_text(
        MODELING.format(config_class=type(config).__name__, model_class=type(model).__name__, model_type=model_type)
    )
    shutil.copyfile(widths.__file__, directory / "twist_widths.py")


def load_exported(directory: str | Path) -> nn.Module:
    """A convenience over from_pretrained: fp32, eval mode, remote code trusted where the export has it,
    and a clear error for a directory that is not an export."""
    directory = Path(directory)
    record_file = directory / SUBNET_FILE
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not a TwIST export (no {SUBNET_FILE}); export one with launch/export.py, "
            "or load a central model with twist_scale.central_io.load_central"
        )
    remote = json.loads(record_file.read_text())["loader"] == REMOTE_LOADER
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=remote).eval()
