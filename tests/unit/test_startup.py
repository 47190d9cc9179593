"""Start-up block by block: the same values a whole fill gives, never the whole model at once,
pretrained weights streamed from safetensors, and nested sampling's unit sort."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from safetensors import safe_open

from twist_scale import startup
from twist_scale.assembly import central_from_model, central_tensors
from twist_scale.central import CentralShards
from twist_scale.models import architecture_of, build_model
from twist_scale.pruning.scores import owned_sum
from twist_scale.startup import blocks, fill, materialise_rest
from twist_scale.subnet import partitioned_blocks
from twist_scale.topology import Topology
from twist_scale.unit_order import sort_units_by_weight_norm


def meta_model(arch: str, pretrained: str = "") -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(arch, "tiny", 64, pretrained, weights=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: a tied head and a scaled residual init
def test_released_blocks_give_the_values_of_a_whole_fill_and_never_the_whole_model(arch):
    whole = meta_model(arch)
    fill(whole, seed=5, pretrained="")
    expected = dict(whole.named_parameters())
    assert not any(t.is_meta for t in whole.state_dict().values())
    if arch == "gpt2":
        assert whole.lm_head.weight is whole.transformer.wte.weight  # still tied after materialising
        residual, other = whole.transformer.h[0].attn.c_proj.weight, whole.transformer.h[0].attn.c_attn.weight
        assert residual.std() < 0.6 * other.std()  # GPT-2's 1/sqrt(2 n_layer) init, as transformers does it

    streamed, kept, live, peak = meta_model(arch), {}, set(), 0

    def keep(name: str, value: torch.Tensor) -> bool:
        nonlocal peak
        kept[name] = value.clone()
        live.add(name)
        live.difference_update(n for n, t in streamed.named_parameters() if t.is_meta)
        peak = max(peak, sum(1 for n in live if n in expected))
        return True

    fill(streamed, seed=5, pretrained="", keep=keep)
    assert kept.keys() >= expected.keys()
    for name, value in expected.items():
        assert torch.equal(kept[name], value), name
    largest_block = max(sum(1 for _ in b.parameters(recurse=r)) for _, b, r in blocks(streamed))
    assert peak <= largest_block < len(expected)  # one block at a time, not the model
    assert all(t.is_meta for t in streamed.parameters())  # everything kept was released
    materialise_rest(streamed)
    assert not any(t.is_meta for t in streamed.parameters())


def test_pretrained_weights_stream_from_safetensors(tmp_path):
    torch.manual_seed(0)
    saved = build_model("llama", "tiny", 64)
    saved.save_pretrained(tmp_path / "base", max_shard_size="200KB")  # sharded: an index and several files
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    model = meta_model("llama", str(tmp_path / "base"))
    fill(model, seed=1, pretrained=str(tmp_path / "base"))
    for (name, value), (_, loaded) in zip(saved.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(loaded, value), name


def test_a_checkpoint_missing_tensors_is_refused_before_anything_is_filled(tmp_path):
    saved = build_model("llama", "tiny", 64)
    saved.save_pretrained(tmp_path / "base")
    model = meta_model("llama", str(tmp_path / "base"))
    with torch.device("meta"):
        model.model.layers.append(type(model.model.layers[0])(model.config, 6))  # a layer the file lacks
    with pytest.raises(ValueError, match=r"lacks 9 of the model's tensors \(e\.g\. model\.layers\.6\."):
        fill(model, seed=1, pretrained=str(tmp_path / "base"))
    assert all(t.is_meta for t in model.parameters())


def unit_norms(model: torch.nn.Module, unit_block) -> torch.Tensor:
    """Each unit's owned squared weight norm."""
    params = dict(model.named_parameters())
    return owned_sum(unit_block, lambda name: params[name].detach().double() ** 2 if name in params else None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: fused q/k/v columns, Conv1D layout
def test_nested_start_sorts_each_blocks_units_by_weight_norm_and_changes_no_output(arch, tmp_path):
    torch.manual_seed(0)
    saved = build_model(arch, "tiny", 64)
    saved.save_pretrained(tmp_path / "base")
    unit_blocks = partitioned_blocks(architecture_of(saved).unit_blocks(saved.config), [])
    model = meta_model(arch, str(tmp_path / "base"))
    sort = functools.partial(sort_units_by_weight_norm, unit_blocks=unit_blocks)
    fill(model, seed=1, pretrained=str(tmp_path / "base"), arrange=sort)

    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():  # heads and neurons permuted: the same function
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, saved.eval()(input_ids=ids).logits)
    for unit_block in unit_blocks:
        before, after = unit_norms(saved, unit_block), unit_norms(model, unit_block)
        assert not torch.all(before[:-1] >= before[1:])  # the base was not sorted already
        assert torch.equal(after, before.sort(descending=True).values), unit_block.key


@pytest.mark.parametrize(("world", "rank"), [(3, 1), (4, 3)])  # uneven pieces; the last rank's is short
def test_a_rank_reads_only_its_pieces_of_a_pretrained_checkpoint(tmp_path, monkeypatch, world, rank):
    """The central pieces read with safetensors slices equal the pieces cut from the whole loaded model,
    no parameter is ever allocated whole, and each read holds at most one piece."""
    torch.manual_seed(0)
    saved = build_model("llama", "tiny", 64)
    saved.save_pretrained(tmp_path / "base", max_shard_size="200KB")
    topo = Topology(world_size=world, rank=rank, groups=1)
    expected = CentralShards(topo, {n: t.shape for n, t in central_tensors(saved).items()})
    for name, value in central_tensors(saved).items():
        expected.set_full(name, value)

    read: dict[str, int] = {}  # elements read from the files, by tensor

    class CountedFile:
        def __init__(self, handle) -> None:  # noqa: ANN001
            self.handle = handle

        def keys(self):  # noqa: ANN202
            return self.handle.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read[name] = read.get(name, 0) + self.handle.get_tensor(name).numel()
            return self.handle.get_tensor(name)

        def get_slice(self, name: str):  # noqa: ANN202
            inner = self.handle.get_slice(name)

            class Slice:
                def get_shape(self):  # noqa: ANN202
                    return inner.get_shape()

                def __getitem__(self, rows):  # noqa: ANN001, ANN204
                    values = inner[rows]
                    read[name] = read.get(name, 0) + values.numel()
                    return values

            return Slice()

    @contextlib.contextmanager
    def counted_open(path, framework):  # noqa: ANN001, ANN202
        with safe_open(path, framework) as handle:
            yield CountedFile(handle)

    monkeypatch.setattr(startup, "safe_open", counted_open)
    model = meta_model("llama", str(tmp_path / "base"))
    central = central_from_model(model, topo, seed=1, pretrained=str(tmp_path / "base"))
    assert central.shards.keys() == expected.shards.keys()
    for name, piece in expected.shards.items():
        assert torch.equal(central.shards[name], piece), name
        row = math.prod(central.shapes[name][1:])  # a piece is read in whole rows: at most one more at each end
        assert read[name] <= central.piece_len(name) + 2 * row, f"{name}: read {read[name]} elements"
    assert all(t.is_meta for t in model.parameters())
