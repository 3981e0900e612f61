"""Specifications of the mask utilities in fedta_utils.masks: counts, tables, overlap, storage."""

from __future__ import annotations

import io

import pytest
import torch

from fedta_utils.masks import (
    count_trainable,
    jaccard,
    mask_density_by_parameter,
    mask_sparsity,
    pack_masks,
    unpack_masks,
)


def hand_made_masks() -> dict[str, torch.Tensor]:
    """10 entries, 4 trainable: block 0 qkv (3 of 6), block 11 bias (1 of 2), cls_token (0 of 2)."""
    return {
        "blocks.0.attn.qkv.weight": torch.tensor([[True, False, True], [False, True, False]]),
        "blocks.11.mlp.fc1.bias": torch.tensor([False, True]),
        "cls_token": torch.tensor([[[False, False]]]),
    }


def random_masks(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) < 0.5 for name, shape in shapes.items()}


ODD_SHAPES = {
    "scalar": (),
    "empty": (0, 3),
    "one": (1,),
    "seven": (7,),
    "odd_matrix": (3, 5),
    "four_d": (2, 3, 3, 3),
    "many": (1000, 3),
}


def test_count_trainable_and_sparsity_of_hand_made_masks():
    masks = hand_made_masks()
    assert count_trainable(masks) == 4
    assert mask_sparsity(masks) == pytest.approx(0.6)


def test_sparsity_of_masks_without_entries_is_refused():
    with pytest.raises(ValueError, match="no entries"):
        mask_sparsity({"empty": torch.ones(0, dtype=torch.bool)})


def test_density_table_has_one_row_per_parameter_with_counts_and_density():
    table = mask_density_by_parameter(hand_made_masks())
    assert list(table.columns) == ["parameter", "entries", "trainable", "density", "block", "kind"]
    assert table["parameter"].tolist() == list(hand_made_masks())
    assert table["entries"].tolist() == [6, 2, 2]
    assert table["trainable"].tolist() == [3, 1, 0]
    assert table["density"].tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_density_table_parses_block_index_and_kind():
    table = mask_density_by_parameter(hand_made_masks())
    assert table["block"].tolist() == [0, 11, -1]
    assert table["kind"].tolist() == ["attn.qkv.weight", "mlp.fc1.bias", "cls_token"]


@pytest.mark.parametrize(
    "name, block, kind",
    [
        ("blocks.3.attn.qkv.weight", 3, "attn.qkv.weight"),
        ("blocks.10.norm1.bias", 10, "norm1.bias"),
        ("patch_embed.proj.weight", -1, "patch_embed.proj.weight"),
        ("pos_embed", -1, "pos_embed"),
        ("model.blocks.3.attn.qkv.weight", -1, "model.blocks.3.attn.qkv.weight"),  # prefix only at the start
    ],
)
def test_density_table_splits_the_block_index_from_the_kind(name, block, kind):
    row = mask_density_by_parameter({name: torch.ones(2, dtype=torch.bool)}).iloc[0]
    assert (row["block"], row["kind"]) == (block, kind)


def test_jaccard_of_hand_made_masks():
    a = {"w": torch.tensor([True, True, False, False]), "b": torch.tensor([True])}
    b = {"w": torch.tensor([True, False, True, False]), "b": torch.tensor([True])}
    assert jaccard(a, b) == pytest.approx(2 / 4)  # both: w[0], b[0]; either: w[0], w[1], w[2], b[0]


def test_jaccard_is_one_for_identical_masks_and_when_both_are_empty():
    masks = hand_made_masks()
    assert jaccard(masks, masks) == 1.0
    frozen = {name: torch.zeros_like(mask) for name, mask in masks.items()}
    assert jaccard(frozen, frozen) == 1.0


def test_jaccard_is_zero_for_complementary_masks():
    masks = hand_made_masks()
    assert jaccard(masks, {name: ~mask for name, mask in masks.items()}) == 0.0


def test_jaccard_refuses_masks_of_different_parameters_or_shapes():
    masks = hand_made_masks()
    with pytest.raises(ValueError, match="cls_token"):
        jaccard(masks, {name: m for name, m in masks.items() if name != "cls_token"})
    with pytest.raises(ValueError, match="cls_token"):
        jaccard(masks, masks | {"cls_token": torch.zeros(3, dtype=torch.bool)})


def test_pack_unpack_round_trip_is_exact_for_odd_sizes_and_shapes():
    masks = random_masks(ODD_SHAPES)
    restored = unpack_masks(pack_masks(masks))
    assert list(restored) == list(masks)
    for name, mask in masks.items():
        assert restored[name].dtype == torch.bool
        assert restored[name].shape == mask.shape
        assert torch.equal(restored[name], mask), name


def test_packed_masks_survive_torch_save_and_weights_only_load():
    masks = random_masks(ODD_SHAPES, seed=1)
    buffer = io.BytesIO()
    torch.save(pack_masks(masks), buffer)
    buffer.seek(0)
    restored = unpack_masks(torch.load(buffer, weights_only=True))
    for name, mask in masks.items():
        assert torch.equal(restored[name], mask), name


def test_packed_masks_take_one_bit_per_entry():
    masks = random_masks({"big": (1000, 80)})
    packed = pack_masks(masks)
    assert packed["big"]["bits"].dtype == torch.uint8
    assert packed["big"]["bits"].numel() == 1000 * 80 // 8
    assert packed["big"]["shape"] == [1000, 80]


def test_unpack_refuses_bits_that_do_not_fit_the_shape():
    packed = pack_masks(random_masks({"w": (4, 4)}))
    packed["w"]["bits"] = packed["w"]["bits"][:1]
    with pytest.raises(ValueError, match="w"):
        unpack_masks(packed)


def test_pack_refuses_non_bool_masks():
    with pytest.raises(ValueError, match="bool"):
        pack_masks({"w": torch.ones(3)})
