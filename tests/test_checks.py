"""snce_fast.checks: the neuron-list normalisations every layer shares."""
import pytest
import torch

from snce_fast.checks import as_neuron_list, given_neurons, unique_neurons


@pytest.mark.parametrize("neurons, given, unique, sorted_", [
    (7, [7], [7], [7]),
    ([5, 2, 5, 9], [5, 2, 5, 9], [5, 2, 9], [2, 5, 9]),
    (torch.tensor([[3], [1]]), [3, 1], [3, 1], [1, 3]),
    (torch.tensor([2, 2], dtype=torch.int32), [2, 2], [2], [2]),
    ((4, 0), [4, 0], [4, 0], [0, 4]),
])
def test_neuron_orders(neurons, given, unique, sorted_):
    assert given_neurons(neurons) == given
    assert unique_neurons(neurons, 10) == unique
    assert as_neuron_list(neurons, 10) == sorted_


@pytest.mark.parametrize("bad", ["251", b"12", True, [1, "x"], None, 2.5j, ["552"], [2.7], [3.0], [True, 2],
                                 torch.tensor([2.7]), torch.tensor([True])])
def test_non_integer_neurons_are_refused(bad):
    """A string is not iterated character by character: "251" would otherwise edit latents [1, 2, 5]."""
    with pytest.raises(TypeError, match="neurons must be an int or a list of ints|expected an integer tensor"):
        as_neuron_list(bad, 1000)


def test_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        given_neurons([])
    with pytest.raises(ValueError, match="neuron index 10 out of range"):
        unique_neurons([3, 10], 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=float("nan")), "scale=nan is not a finite number"),
    (dict(scale=float("-inf")), "scale=-inf is not a finite number"),
    (dict(clamp=float("inf")), "clamp=inf is not a finite number"),
    (dict(gate=True, threshold=float("nan")), "threshold nan is not finite"),
    (dict(gate=True, threshold=[0.1, float("nan")]), "is not finite"),
])
def test_edits_refuse_non_finite_rules(kwargs, match):
    """A NaN scale or clamp would put NaN into the embeddings; a NaN gate threshold never fires (a
    silently disabled erasure): all refused by the library, not only by the CLI."""
    from snce_fast.ops import reference
    from snce_fast.testing import random_sae

    sae = random_sae(8, 16, 2)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=match):
        reference.edit(x, sae, [1, 2], **kwargs)
