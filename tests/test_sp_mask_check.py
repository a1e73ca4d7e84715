"""Sequence-parallel attention takes a key mask over text keys only; one that masks image keys is refused. The check
reads the mask on the host, so it runs once per mask tensor (a model passes one mask to every block), not per call."""
import pytest
import torch

from engine.attention import sdpa_attention
from engine.parallel.attention import JointSequenceParallelAttention, split_joint


def _masks(text: int, image: int, mask_image_key: bool):
    key_mask = torch.ones(2, text + image, dtype=torch.bool)
    key_mask[1, text - 1] = False  # a padded text key: allowed
    if mask_image_key:
        key_mask[0, text + 3] = False
    return key_mask, split_joint(key_mask, text, True)[1]


def test_a_mask_over_image_keys_is_refused_even_after_a_valid_one():
    attn = JointSequenceParallelAttention(None, local_attention=sdpa_attention)  # the check needs no process group
    good, good_image = _masks(5, 8, mask_image_key=False)
    for _ in range(3):  # every block of a forward: the same mask, read once
        attn._check_image_keys_unmasked(good, good_image)
    bad, bad_image = _masks(5, 8, mask_image_key=True)
    with pytest.raises(ValueError, match="masks text keys only"):
        attn._check_image_keys_unmasked(bad, bad_image)


def test_the_mask_is_read_once_per_tensor(monkeypatch):
    attn = JointSequenceParallelAttention(None, local_attention=sdpa_attention)
    reads = []
    mask, image = _masks(5, 8, mask_image_key=False)

    class Counting(torch.Tensor):
        def all(self, *args, **kwargs):
            reads.append(1)
            return super().all(*args, **kwargs)

    image = image.as_subclass(Counting)
    for _ in range(4):
        attn._check_image_keys_unmasked(mask, image)
    assert len(reads) == 1
    attn._check_image_keys_unmasked(mask.clone(), image)  # the next forward's mask: read again
    assert len(reads) == 2
