"""patch with offloaded encoders (accelerate's cpu_offload, diffusers' model and group offloading), on the
CPU: the patch state goes to the execution device the offloading hooks name, not to the first
parameter's device (`meta` after cpu_offload); and `from_pipe` siblings of a patched pipeline warn when
prompt_embeds bypass the patch."""
from __future__ import annotations

import types
import warnings

import pytest
import torch

import snce_fast
from snce_fast.hooks.devices import execution_device
from snce_fast.ops import reference
from snce_fast.testing import random_sae, sd_pipeline

pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'snce_fast[peers]'")

PROMPT = "a photo of a nude cat"


def embeds(pipe, **kw):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                  **kw)[0]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """(plain embeddings, patched embeddings, sae, neurons) from a pipeline that is never offloaded."""
    pipe = sd_pipeline(tmp_path_factory.mktemp("ref"))
    sae = random_sae(32, 64, 4)
    plain = embeds(pipe)
    _, idx = reference.encode(plain[:, 1:], sae)
    neurons = sorted(set(idx.flatten().tolist()))[:3]
    with snce_fast.patched(pipe, sae, neurons):
        edited = embeds(pipe)
    assert not torch.equal(edited, plain)
    return plain, edited, sae, neurons


def _cpu_offload(pipe):
    accelerate.cpu_offload(pipe.text_encoder, execution_device="cpu")


def _model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")


def _group_offload(pipe):
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(pipe.text_encoder, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)


@pytest.mark.parametrize("offload", [_cpu_offload, _model_offload, _group_offload])
@pytest.mark.parametrize("order", ["patch after offload", "patch before offload"])
def test_patch_with_offloading(tmp_path, reference_run, offload, order):
    plain, edited, sae, neurons = reference_run
    pipe = sd_pipeline(tmp_path)
    if order == "patch after offload":
        offload(pipe)
        snce_fast.patch(pipe, sae, neurons)
    else:
        snce_fast.patch(pipe, sae, neurons)
        offload(pipe)
    assert torch.equal(embeds(pipe), edited)
    snce_fast.unpatch(pipe)
    assert torch.equal(embeds(pipe), plain)


def test_cpu_offloaded_encoder_has_meta_parameters_but_a_cpu_execution_device(tmp_path):
    pipe = sd_pipeline(tmp_path)
    _cpu_offload(pipe)
    assert next(pipe.text_encoder.parameters()).device.type == "meta"
    assert execution_device(pipe.text_encoder) == torch.device("cpu")


def test_execution_device_comes_from_the_hooks_first():
    enc = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert execution_device(enc) == torch.device("cpu")
    enc[0]._hf_hook = types.SimpleNamespace(hooks=[types.SimpleNamespace(execution_device="cuda:1")])  # SequentialHook
    assert execution_device(enc) == torch.device("cuda:1")
    enc[0]._hf_hook = types.SimpleNamespace(execution_device=None)
    assert execution_device(enc) == torch.device("cpu")


def test_from_pipe_sibling_made_after_patching_warns_on_prompt_embeds(tmp_path, reference_run):
    from diffusers import AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline

    plain, _, sae, neurons = reference_run
    pipe = sd_pipeline(tmp_path)
    handle = snce_fast.patch(pipe, sae, neurons)
    siblings = [StableDiffusionImg2ImgPipeline.from_pipe(pipe), AutoPipelineForImage2Image.from_pipe(pipe),
                type(pipe)(**pipe.components)]
    for sibling in siblings:
        assert snce_fast.is_patched(sibling)
        with pytest.warns(UserWarning, match="prompt_embeds were passed directly"):
            sibling.encode_prompt(None, "cpu", 1, False, prompt_embeds=plain)
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for sibling in siblings:
            sibling.encode_prompt(None, "cpu", 1, False, prompt_embeds=plain)
