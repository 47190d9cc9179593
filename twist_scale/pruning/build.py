"""A κ-subnet as a new, smaller dense model with the activation-shift correction folded into its weights.

Train once, deploy many: the same central model gives every κ. The correction the model was trained
with is folded, so the subnet needs no hooks at inference (`twist_scale.correction`, `fold`):
- 'scale': the output projection's kept input channels are multiplied by 1/κ_layer (its weight);
- 'mean': W[:, dropped] · E[a_dropped] is added to the output projection's bias. Llama has no
  biases, so the architecture's `enable_bias` turns on `attention_bias` and `mlp_bias` with zero
  q/k/v/gate/up biases (and zero o/down biases in layers that lose nothing).
The architecture's `shrunk_config` states the subnet's widths when its config can (uniform widths);
the subnet is *plain* when that config rebuilds every parameter's shape, which `unstated_shapes` checks
by building the config's model on the meta device. Anything else loads through remote code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from twist_scale.correction import correction_of
from twist_scale.models import UnitBlock, Widths, architecture_of
from twist_scale.subnet import SubnetSpec, apply_subnet_shapes


def layer_widths(unit_blocks: list[UnitBlock], spec: SubnetSpec) -> Widths:
    widths: Widths = {}
    for unit_block in unit_blocks:
        widths.setdefault(unit_block.layer, {})[unit_block.kind] = len(spec.units(unit_block))
    return widths


@torch.no_grad()
def build_subnet(
    model: nn.Module, spec: SubnetSpec, correction: str = "none", means: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, bool]:
    """The spec's subnet as a new dense model with the correction folded; `model` is left untouched.

    `means` maps output-module names to unit activation means (correction 'mean'). Returns the
    model and whether its config states its widths (True: plain from_pretrained can load it).
    """
    fold = correction_of(correction)
    sub = copy.deepcopy(model).eval()
    arch = architecture_of(sub)
    groups = arch.unit_blocks(sub.config)
    pruned = [unit_block for unit_block in groups if len(spec.units(unit_block)) < unit_block.num_units]
    if fold.folds_bias and pruned:
        arch.enable_bias(sub)
        groups = arch.unit_blocks(sub.config)  # the unit map now owns the new q/k/v/gate/up biases too
        pruned = [unit_block for unit_block in groups if len(spec.units(unit_block)) < unit_block.num_units]
    for unit_block in pruned:  # from full-width weights, before slicing
        fold.fold(sub.get_submodule(unit_block.output_module), unit_block, spec.units(unit_block), means or {})
    apply_subnet_shapes(sub, groups, spec)
    config = arch.shrunk_config(sub.config, layer_widths(groups, spec))
    if config is not None:
        sub.config = config
    return sub, config is not None and not unstated_shapes(sub)


def unstated_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The parameters whose shape the model's config does not give (sliced to per-layer widths, or a
    bias the config has no flag for): what an export's remote code must resize. Empty: plain."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    expected = {name: p.shape for name, p in skeleton.named_parameters()}
    return {name: list(p.shape) for name, p in model.named_parameters() if expected.get(name) != p.shape}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
