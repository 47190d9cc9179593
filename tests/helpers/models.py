"""Tiny random models, a word-level tokenizer and the masked-model oracle shared by the export tests."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import PreTrainedTokenizerFast

from twist_scale.correction import correction_of, dropped_contribution
from twist_scale.models import architecture_of, build_model
from twist_scale.subnet import SubnetSpec, apply_unit_masks

VOCAB = 61


@functools.cache
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer, so exports carry a tokenizer like real ones do."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def random_model(arch: str, size: str = "tiny", seed: int = 0) -> torch.nn.Module:
    """Random weights large enough that every correction visibly moves the logits."""
    torch.manual_seed(seed)
    model = build_model(arch, size, VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def oracle_logits(model, groups, spec: SubnetSpec, correction: str, means, ids: torch.Tensor) -> torch.Tensor:
    """Full width, dropped units zeroed, the correction applied by the training hooks."""
    ref = copy.deepcopy(model)
    strategy = correction_of(correction)
    strategy.install(ref, groups, momentum=0.9)
    for unit_block in groups:
        module = ref.get_submodule(unit_block.output_module)
        kept = spec.units(unit_block)
        shift = None
        if strategy.needs_shift:
            shift = dropped_contribution(module.weight.detach(), means[unit_block.output_module], unit_block, kept)
        strategy.dispatch(module, unit_block, kept, shift)
    apply_unit_masks(ref, architecture_of(ref).unit_blocks(ref.config), spec)
    with torch.no_grad():
        return ref.eval()(input_ids=ids).logits
