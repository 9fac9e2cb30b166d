"""patch refuses inputs that would erase silently wrong: NaN/inf SAE weights (edited in memory) and
neurons given as a str; nothing is hooked when it refuses."""
import pytest
import torch

import snce_fast
from snce_fast.testing import clip_text_model, random_sae, write_clip_tokenizer


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = write_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return clip_text_model(tok, hidden=32, layers=2)


@pytest.fixture(autouse=True)
def _unpatched(encoder):
    """Each test starts and ends with an unpatched encoder (a patch a test failed to refuse does not leak)."""
    snce_fast.unpatch(encoder)
    yield
    snce_fast.unpatch(encoder)


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _refused(encoder, error, match, *args, **kwargs):
    before = _hook_count(encoder)
    with pytest.raises(error, match=match):
        snce_fast.patch(encoder, *args, **kwargs)
    assert not snce_fast.is_patched(encoder)
    assert _hook_count(encoder) == before


@pytest.mark.parametrize("name, value", [("b_enc", float("nan")), ("W_dec", float("inf")),
                                         ("W_enc", float("-inf")), ("b_dec", float("nan"))])
def test_patch_refuses_nonfinite_sae(encoder, name, value):
    sae = random_sae(32, 64, 4)
    with torch.no_grad():
        getattr(sae, name).view(-1)[:2] = value  # someone edited the weights in memory
    _refused(encoder, ValueError, rf"the SAE for 'encoder': {name} has 2 NaN/inf values", sae, 3)
    _refused(encoder, ValueError, rf"{name} has 2 NaN/inf values", sae, 3, mode="reconstruct")


def test_patch_refuses_nonfinite_erasure(encoder):
    slim = random_sae(32, 64, 4).slim([3, 7])
    with torch.no_grad():
        slim.W_dec_targets[1, 0] = float("nan")
    _refused(encoder, ValueError, r"the SAE for 'encoder': W_dec_targets has 1 NaN/inf values", slim)


def test_patch_refuses_neurons_as_str(encoder):
    sae = random_sae(32, 300, 4)
    _refused(encoder, TypeError, "neurons must be an int or a list of ints, got str '251'", sae, neurons="251")
    _refused(encoder, TypeError, "got str '251'", {"encoder": sae}, neurons={"encoder": "251"})


def test_clean_sae_still_patches(encoder):
    with snce_fast.patched(encoder, random_sae(32, 64, 4), [3]) as handle:
        assert handle.active
    assert not snce_fast.is_patched(encoder)
