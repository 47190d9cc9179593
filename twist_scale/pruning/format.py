"""The export format: a dense checkpoint, its tokenizer, `twist_subnet.json` and a README, and its one loader.

Uniform widths load with plain `AutoModelForCausalLM.from_pretrained`. Widths a Hugging Face
config cannot express (shared layers kept whole; any pruned GPT-2 attention, whose head size is
tied to n_embd / n_head) keep the full-width config.json — plain loading then fails on a size
mismatch — and load through `load_exported`, which reads the per-layer widths from
twist_subnet.json. `load_exported` also loads the uniform kind, so it is the one call to use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from twist_scale.atomic import atomic_directory
from twist_scale.models import architecture_of
from twist_scale.pruning.build import parameter_count
from twist_scale.subnet import SubnetSpec, apply_subnet_shapes

SUBNET_FILE = "twist_subnet.json"
PLAIN_LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
TWIST_LOADER = "twist_scale.pruning.load_exported"


README = """# TwIST subnet export

The κ={kappa:g} subnet of `{source}` as a dense model: {parameters:,} parameters, pruning method
`{method}` (seed {seed}), activation-shift correction `{correction}` folded into the weights.

Load it with:

```python
{load}
```

{why}

`twist_subnet.json` records the per-layer widths and which units of the central model were kept.
"""


def save_exported(
    directory: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, plain: bool, record: dict
) -> Path:
    """Checkpoint + tokenizer + twist_subnet.json + README.md, written aside and renamed (never half a model)."""
    directory = Path(directory)
    loader = PLAIN_LOADER if plain else TWIST_LOADER
    if not plain:  # makes the full-width config.json say why plain loading reports size mismatches
        model.config.twist_subnet = f"per-layer widths in {SUBNET_FILE}: load with {TWIST_LOADER}(dir)"
    record = {"loader": loader, "parameters": parameter_count(model), **record}
    load = (
        f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{directory}")'
        if plain
        else f'from twist_scale.pruning import load_exported\nmodel = load_exported("{directory}")'
    )
    why = (
        "Every layer has the same width, so config.json states it and any Hugging Face tool loads it."
        if plain
        else "Layers have different widths (or a width the architecture's config cannot state), so config.json "
        "keeps the full-width shape and `AutoModelForCausalLM.from_pretrained` fails with size mismatches."
    )
    fields = {"source": "?", "method": "?", "seed": 0, "correction": "none"} | record
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SUBNET_FILE).write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(README.format(load=load, why=why, **fields))
    return directory


def load_exported(directory: str | Path) -> nn.Module:
    """The one loader for every export: plain from_pretrained when the config states the widths,
    else build the full-width skeleton, shrink it to the recorded widths and load the weights."""
    directory = Path(directory)
    record_file = directory / SUBNET_FILE
    if not record_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not a TwIST export (no {SUBNET_FILE}); export one with launch/export.py, "
            "or load a central model with twist_scale.central_io.load_central"
        )
    record = json.loads(record_file.read_text())
    if record["loader"] == PLAIN_LOADER:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(directory)
    with no_init_weights():  # every value is overwritten below; untouched memory never becomes resident
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # init_weights, skipped above, is also what ties the LM head to the embeddings
    widths = {int(layer): w for layer, w in record["widths"].items()}
    groups = architecture_of(model).unit_blocks(config)
    apply_subnet_shapes(
        model,
        groups,
        SubnetSpec({unit_block.key: tuple(range(widths[unit_block.layer][unit_block.kind])) for unit_block in groups}),
    )
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state |= load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}
    untied = [n for n in missing if n in params and id(params[n]) not in loaded]  # tied embeddings are fine
    if untied or unexpected:
        raise RuntimeError(
            f"{directory}: checkpoint does not match its {SUBNET_FILE}: missing {untied}, unexpected {unexpected}"
        )
    return model.eval()
