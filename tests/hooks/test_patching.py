"""patch / unpatch on tiny random SD1.x and SDXL pipelines and bare encoders (docs/method.md, docs/api.md)."""
import os
import sys
import warnings

import pytest
import torch

import snce_fast
from snce_fast.ops import reference
from snce_fast.hooks.points import run_to_hook
from snce_fast.testing import bert_model, random_sae, sd_pipeline, sdxl_pipeline, write_bert_tokenizer

pytest.importorskip("diffusers")

PROMPT = "a photo of a cat"
NEG = ""


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def embeds(pipe, prompt=PROMPT, **kw):
    with torch.no_grad():
        out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, **kw)
    return out[0] if len(out) == 2 else out  # SD returns (embeds, neg); SDXL returns 4 tensors


def images(pipe, prompt=PROMPT, **kw):
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=gen, height=16, width=16, **kw).images


def hidden_at_output(encoder, tokenizer, prompt, penultimate=False):
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        if penultimate:
            return encoder(ids, output_hidden_states=True).hidden_states[-2]
        return encoder(ids).last_hidden_state


def fired_latents(sae, hidden, stop=None):
    """Latents firing at positions 1..stop-1 (BOS is never edited)."""
    v, i = reference.encode(hidden[:, 1:stop], sae)
    return set(i[v > 0].tolist())


def pick(sae, hiddens, stop=None):
    """(the latent firing most often on hiddens[0][:, 1:stop], a latent firing nowhere on any of them)."""
    silent = set(range(sae.n_latents)) - set().union(*(fired_latents(sae, h) for h in hiddens))
    v, i = reference.encode(hiddens[0][:, 1:stop], sae)
    fired = i[v > 0]
    assert fired.numel() and silent, "test setup: need both a firing and a silent latent"
    return int(fired.bincount().argmax()), min(silent)


# -- SD 1.x ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_sae(sd):
    return random_sae(32, n=256, k=3, seed=7)


@pytest.fixture(scope="module")
def sd_latents(sd, sd_sae):
    h = [hidden_at_output(sd.text_encoder, sd.tokenizer, p) for p in (PROMPT, NEG)]
    return pick(sd_sae, h)


def test_silent_latent_gives_bit_identical_embeddings_and_images(sd, sd_sae, sd_latents):
    _, silent = sd_latents
    base_embeds, base_images = embeds(sd), images(sd)
    with snce_fast.patched(sd, sd_sae, silent):
        assert snce_fast.is_patched(sd)
        assert torch.equal(embeds(sd), base_embeds)
        assert (images(sd) == base_images).all()
    assert not snce_fast.is_patched(sd)


def test_firing_latent_changes_only_along_its_decoder_row(sd, sd_sae, sd_latents):
    j, _ = sd_latents
    hidden = hidden_at_output(sd.text_encoder, sd.tokenizer, PROMPT)
    base = embeds(sd)
    assert torch.equal(base, hidden)
    with snce_fast.patched(sd, sd_sae, j):
        edited = embeds(sd)
    mask = torch.arange(hidden.shape[1]) >= 1
    assert torch.equal(edited, reference.edit(hidden, sd_sae, j, edit_mask=mask.expand(1, -1)))
    assert torch.equal(edited[:, 0], base[:, 0]), "BOS must never be edited"
    delta = (edited - base)[0]
    changed = delta.abs().sum(-1) > 0
    assert changed.any()
    v, i = reference.encode(hidden, sd_sae)
    z_j = (v.float() * (i == j)).sum(-1)[0]
    torch.testing.assert_close(delta[changed], -z_j[changed, None] * sd_sae.W_dec[j].detach(), rtol=1e-4, atol=1e-5)
    assert not (images(sd) == 0).all()


def test_scale_and_clamp_rules(sd, sd_sae, sd_latents):
    j, _ = sd_latents
    hidden = hidden_at_output(sd.text_encoder, sd.tokenizer, PROMPT)
    mask = (torch.arange(hidden.shape[1]) >= 1).expand(1, -1)
    for kw in (dict(scale=-8.0), dict(clamp=0.05)):
        with snce_fast.patched(sd, sd_sae, [j], **kw):
            assert torch.equal(embeds(sd), reference.edit(hidden, sd_sae, j, edit_mask=mask, **kw))


def test_reconstruct_mode_matches_reference(sd, sd_sae, sd_latents):
    j, _ = sd_latents
    hidden = hidden_at_output(sd.text_encoder, sd.tokenizer, PROMPT)
    mask = (torch.arange(hidden.shape[1]) >= 1).expand(1, -1)
    with snce_fast.patched(sd, sd_sae, j, mode="reconstruct"):
        out = embeds(sd)
    torch.testing.assert_close(out, reference.edit(hidden, sd_sae, j, mode="reconstruct", edit_mask=mask))
    assert torch.equal(out[:, 0], hidden[:, 0])


def test_unpatch_restores_bit_identical_outputs(sd, sd_sae, sd_latents):
    j, _ = sd_latents
    base_embeds, base_images = embeds(sd), images(sd)
    handle = snce_fast.patch(sd, sd_sae, j)
    assert not torch.equal(embeds(sd), base_embeds)
    assert not (images(sd) == base_images).all()
    handle.remove()
    assert torch.equal(embeds(sd), base_embeds) and (images(sd) == base_images).all()
    snce_fast.patch(sd, sd_sae, j)
    snce_fast.unpatch(sd)
    assert torch.equal(embeds(sd), base_embeds)
    assert "encode_prompt" not in vars(sd)
    snce_fast.unpatch(sd)  # unpatching an unpatched pipeline is a no-op


def test_patching_twice_does_not_double_apply(sd, sd_sae, sd_latents):
    j, _ = sd_latents
    with snce_fast.patched(sd, sd_sae, j, scale=0.5):
        once = embeds(sd)
    snce_fast.patch(sd, sd_sae, j, scale=0.5)
    snce_fast.patch(sd, sd_sae, j, scale=0.5)
    try:
        assert torch.equal(embeds(sd), once)
        assert len(sd.text_encoder._forward_hooks) == 1  # only the id-clearing hook on the root
    finally:
        snce_fast.unpatch(sd)
    assert len(sd.text_encoder._forward_hooks) == 0 and len(sd.text_encoder._forward_pre_hooks) == 0


def test_state_lives_on_the_encoder_and_is_not_saved(sd, sd_sae, sd_latents):
    keys = set(sd.text_encoder.state_dict())
    with snce_fast.patched(sd, sd_sae, sd_latents[0]):
        state = sd.text_encoder._snce_fast
        # residual mode holds the target rows of the decoder only (docs/api.md: lower load memory)
        assert state.W_dec is None
        assert torch.equal(state.W_dec_targets, sd_sae.W_dec[[sd_latents[0]]])
        assert set(sd.text_encoder.state_dict()) == keys
        sd.text_encoder.to(torch.float64)
        assert state.W_enc.dtype == torch.float64 and state.W_dec_targets.dtype == torch.float64
        sd.text_encoder.to(torch.float32)
    assert not hasattr(sd.text_encoder, "_snce_fast")


def test_gate_edits_only_prompts_that_fire_enough(sd, sd_sae, sd_latents):
    j, _ = sd_latents
    hidden = hidden_at_output(sd.text_encoder, sd.tokenizer, PROMPT)
    ids = sd.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = int((ids[0] == sd.tokenizer.eos_token_id).int().argmax())
    v, i = reference.encode(hidden[:, 1 : eos + 1], sd_sae)
    n_counted = int(((i == j) & (v > 0)).any(-1).sum())
    base = embeds(sd)
    with snce_fast.patched(sd, sd_sae, j, gate=True, min_tokens=n_counted + 1):
        assert torch.equal(embeds(sd), base)
    if n_counted:
        with snce_fast.patched(sd, sd_sae, j, gate=True, min_tokens=n_counted):
            assert not torch.equal(embeds(sd), base)


def clip_skip_embeds(pipe, clip_skip=1):
    """What SD pipelines do for clip_skip: final_layer_norm on an earlier hidden state,
    called outside the encoder's forward. (diffusers 0.42 reaches the norm through
    `text_encoder.text_model`, which transformers 5 no longer has, so we call it by role.)"""
    enc = pipe.text_encoder
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = enc(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        norm = getattr(getattr(enc, "text_model", enc), "final_layer_norm")
        return norm(hs), hs


def test_clip_skip_output_hook_edits_the_skipped_layer_norm(sd, sd_sae):
    """The "output" hook sits on final_layer_norm, so clip_skip's extra call is edited too (documented)."""
    base, hs = clip_skip_embeds(sd)
    j, _ = pick(sd_sae, [base])
    with snce_fast.patched(sd, sd_sae, j):
        edited, hs_patched = clip_skip_embeds(sd)
    assert torch.equal(hs_patched, hs)
    mask = (torch.arange(77) >= 1).expand(1, -1)
    assert torch.equal(edited, reference.edit(base, sd_sae, j, edit_mask=mask))
    assert not torch.equal(edited, base)


def test_prompt_embeds_bypass_warns(sd, sd_sae, sd_latents):
    pe = embeds(sd)
    with snce_fast.patched(sd, sd_sae, sd_latents[0]):
        with pytest.warns(UserWarning, match="prompt_embeds were passed directly"):
            sd(prompt_embeds=pe, num_inference_steps=1, output_type="np", height=16, width=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sd(prompt_embeds=pe, num_inference_steps=1, output_type="np", height=16, width=16)


def test_bad_inputs(sd, sd_sae):
    with pytest.raises(ValueError, match=r"d_in=16 but the encoder \(CLIPTextModel\w*\) has width 32"):
        snce_fast.patch(sd, random_sae(16, 32, 2), 0)
    with pytest.raises(ValueError, match="out of range"):
        snce_fast.patch(sd, sd_sae, 10_000)
    with pytest.raises(ValueError, match="does not match the hook"):
        snce_fast.patch(sd, sd_sae, 1, hook="layer:1")
    with pytest.raises(ValueError, match="mode="):
        snce_fast.patch(sd, sd_sae, 1, mode="zero")
    assert not snce_fast.is_patched(sd)


def test_unsupported_pipeline_type_error(sd, sd_sae):
    class FluxPipeline:
        components = {}

    with pytest.raises(TypeError, match="FluxPipeline is not supported.*StableDiffusionXLPipeline"):
        snce_fast.patch(FluxPipeline(), sd_sae, 0)
    with pytest.raises(TypeError, match="text encoder"):
        snce_fast.patch(torch.nn.Linear(3, 3), sd_sae, 0)


# -- SDXL ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl_saes():
    return {"text_encoder": random_sae(32, n=256, k=3, seed=11), "text_encoder_2": random_sae(32, n=256, k=3, seed=12)}


def xl_latents(sdxl, xl_saes):
    out = {}
    for name, tok in (("text_encoder", sdxl.tokenizer), ("text_encoder_2", sdxl.tokenizer_2)):
        enc = getattr(sdxl, name)
        h = [hidden_at_output(enc, tok, p, penultimate=True) for p in (PROMPT, NEG)]
        out[name] = pick(xl_saes[name], h, stop=len(tok(PROMPT).input_ids))  # fire before EOS: reaches pooled
    return out


def test_sdxl_silent_latents_are_bit_identical(sdxl, xl_saes):
    lat = xl_latents(sdxl, xl_saes)
    base_e, base_i = embeds(sdxl), images(sdxl)
    with snce_fast.patched(sdxl, xl_saes, {k: v[1] for k, v in lat.items()}):
        for a, b in zip(embeds(sdxl), base_e):
            assert (a is None and b is None) or torch.equal(a, b)
        assert (images(sdxl) == base_i).all()


def test_sdxl_edits_penultimate_hidden_state_and_pooled_output(sdxl, xl_saes):
    lat = xl_latents(sdxl, xl_saes)
    base_e = embeds(sdxl)
    h1 = hidden_at_output(sdxl.text_encoder, sdxl.tokenizer, PROMPT, penultimate=True)
    h2 = hidden_at_output(sdxl.text_encoder_2, sdxl.tokenizer_2, PROMPT, penultimate=True)
    mask = (torch.arange(77) >= 1).expand(1, -1)
    with snce_fast.patched(sdxl, xl_saes, {k: v[0] for k, v in lat.items()}):
        edited = embeds(sdxl)
    expected = torch.cat(
        [reference.edit(h1, xl_saes["text_encoder"], lat["text_encoder"][0], edit_mask=mask),
         reference.edit(h2, xl_saes["text_encoder_2"], lat["text_encoder_2"][0], edit_mask=mask)], dim=-1)
    torch.testing.assert_close(edited[0], expected)
    assert not torch.equal(edited[2], base_e[2]), "SDXL's pooled output should follow the edit"


def test_sdxl_one_encoder_only_and_single_sae_error(sdxl, xl_saes):
    lat = xl_latents(sdxl, xl_saes)
    h = snce_fast.patch(sdxl, {"text_encoder_2": xl_saes["text_encoder_2"]}, lat["text_encoder_2"][0])
    assert list(h.encoders) == ["text_encoder_2"] and not hasattr(sdxl.text_encoder, "_snce_fast")
    h.remove()
    with pytest.raises(ValueError, match="one SAE per encoder"):
        snce_fast.patch(sdxl, xl_saes["text_encoder"], 0)
    with pytest.raises(ValueError, match="names encoder"):
        snce_fast.patch(sdxl, {"text_encoder_3": xl_saes["text_encoder"]}, 0)


# -- bare encoders ---------------------------------------------------------------------------------
def test_bare_clip_encoder_layer_hook(sd):
    enc, tok = sd.text_encoder, sd.tokenizer
    sae = random_sae(32, n=128, k=3, seed=5, hook="layer:1")
    ids = tok([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = enc(ids).last_hidden_state
        layer1 = enc(ids, output_hidden_states=True).hidden_states[2]
    assert torch.equal(run_to_hook(enc, "layer:1", lambda: enc(ids)), layer1)
    j, _ = pick(sae, [layer1])
    with snce_fast.patched(enc, sae, j) as handle:
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        mask = (torch.arange(77) >= 1).expand(1, -1)
        assert torch.equal(out.hidden_states[2], reference.edit(layer1, sae, j, edit_mask=mask))
        assert not torch.equal(out.last_hidden_state, base)
        assert handle.active
    with torch.no_grad():
        assert torch.equal(enc(ids).last_hidden_state, base)


def test_bare_bert_encoder(tmp_path):
    tok = write_bert_tokenizer(tmp_path)
    enc = bert_model(tok)
    sae = random_sae(32, n=128, k=3, seed=6)
    batch = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        base = enc(**batch).last_hidden_state
    j, silent = pick(sae, [base])
    with snce_fast.patched(enc, sae, silent):
        with torch.no_grad():
            assert torch.equal(enc(**batch).last_hidden_state, base)
    with snce_fast.patched(enc, sae, j):
        with torch.no_grad():
            out = enc(**batch).last_hidden_state
    mask = (torch.arange(base.shape[1]) >= 1).expand(1, -1)
    assert torch.equal(out, reference.edit(base, sae, j, edit_mask=mask))


def test_self_check_refuses_a_hook_that_misses_hidden_states(sdxl, xl_saes, monkeypatch):
    import snce_fast.hooks.patching as patching

    monkeypatch.setattr(patching, "hidden_states_index", lambda *a, **k: 1)  # pretend SDXL reads layer 0
    with pytest.raises(RuntimeError, match="self-check failed"):
        snce_fast.patch(sdxl, xl_saes, 0)
    assert not snce_fast.is_patched(sdxl)


def test_patch_runs_the_triton_kernels_like_the_reference(sd, sd_sae, sd_latents, monkeypatch, triton_on_cpu):
    """The fused path `patch` takes on CUDA, exercised on the CPU through the Triton interpreter."""
    from snce_fast.ops import backend

    j, silent = sd_latents
    base = embeds(sd)
    outputs = {}
    for name in ("reference", "triton"):
        monkeypatch.setenv("SNCE_FAST_BACKEND", name)
        assert backend.implementation("edit", torch.device("cpu"))[0] == name
        with snce_fast.patched(sd, sd_sae, [j, silent], gate=True, min_tokens=1):
            outputs[name] = embeds(sd)
        with snce_fast.patched(sd, sd_sae, silent):
            assert torch.equal(embeds(sd), base)
    assert not torch.equal(outputs["triton"], base)
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-5, atol=1e-5)
    unchanged = (outputs["reference"] == base).all(-1)
    assert torch.equal(outputs["triton"][unchanged], base[unchanged])


@pytest.mark.parametrize("gate", [False, True])
def test_a_patched_forward_on_the_fused_path_makes_no_tensor_from_python_values(sd, sd_sae, sd_latents, monkeypatch,
                                                                               triton_on_cpu, gate):
    """After the first call, the hook's edit builds nothing with torch.tensor: on a GPU that would be a
    host-to-device copy per encoder call, and it would make the patched encoder uncapturable in a CUDA graph."""
    monkeypatch.setenv("SNCE_FAST_BACKEND", "triton")
    enc = sd.text_encoder
    ids = sd.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    j, silent = sd_latents
    with snce_fast.patched(enc, sd_sae, [j, silent], gate=gate, threshold=[0.0, 0.5] if gate else 0.0), torch.no_grad():
        first = enc(ids).last_hidden_state
        made = []
        real = torch.tensor
        ours = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (snce_fast, snce_fast.kernels))

        def counting(*a, **k):
            caller = os.path.abspath(sys._getframe(1).f_code.co_filename)  # only our code's calls (not transformers')
            if caller.startswith(ours):
                made.append((caller, a))
            return real(*a, **k)

        monkeypatch.setattr(torch, "tensor", counting)
        again = enc(ids).last_hidden_state
        monkeypatch.setattr(torch, "tensor", real)
    assert made == []
    assert torch.equal(again, first)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_patched_encoder_compiles_without_graph_breaks(sd, sd_sae, sd_latents, backend_name, monkeypatch, request):
    """torch.compile(fullgraph=True) of a patched encoder: any graph break would raise."""
    if backend_name == "triton":
        request.getfixturevalue("triton_on_cpu")
    monkeypatch.setenv("SNCE_FAST_BACKEND", backend_name)
    enc = sd.text_encoder
    ids = sd.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch._dynamo.reset()
    with snce_fast.patched(enc, sd_sae, [sd_latents[0]], gate=True):
        with torch.no_grad():
            eager = enc(ids).last_hidden_state
            compiled = torch.compile(enc, backend="aot_eager", fullgraph=True)(input_ids=ids).last_hidden_state
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_bare_encoder_penultimate_output_matches_the_sdxl_pipeline(sdxl, xl_saes):
    """patch / detect on a bare SDXL encoder with penultimate_output=True edit and read exactly what the
    pipeline does (hidden_states[-2]), so tools can skip loading the UNet."""
    lat = xl_latents(sdxl, xl_saes)
    name, enc, tok = "text_encoder_2", sdxl.text_encoder_2, sdxl.tokenizer_2
    sae, j = xl_saes[name], lat[name][0]
    with snce_fast.patched(sdxl, {name: sae}, {name: j}):
        via_pipe = hidden_at_output(enc, tok, PROMPT, penultimate=True)
    with snce_fast.patched(enc, sae, j, penultimate_output=True):
        via_bare = hidden_at_output(enc, tok, PROMPT, penultimate=True)
    base = hidden_at_output(enc, tok, PROMPT, penultimate=True)
    assert not torch.equal(via_bare, base)
    assert torch.equal(via_bare, via_pipe)
    prompts = [PROMPT, NEG]
    a = snce_fast.detect(sdxl, {name: sae}, {name: [j]}, prompts)
    b = snce_fast.detect(enc, sae, [j], prompts, tokenizer=tok, penultimate_output=True)
    assert torch.equal(a.flags, b.flags) and torch.equal(a.scores, b.scores)
    c = snce_fast.detect(enc, sae, [j], prompts, tokenizer=tok)  # the final output: another tensor
    assert not torch.equal(c.scores, b.scores)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_gate_with_one_threshold_per_neuron(sd, sd_sae, monkeypatch, backend_name, request):
    """A per-neuron gate threshold (as calibrate gives) is the same as the gate on each neuron alone:
    a prompt is edited iff some target beats its own threshold on >= min_tokens counted tokens."""
    if backend_name == "triton":
        request.getfixturevalue("triton_on_cpu")
    monkeypatch.setenv("SNCE_FAST_BACKEND", backend_name)
    hidden = hidden_at_output(sd.text_encoder, sd.tokenizer, PROMPT)
    v, i = reference.encode(hidden[:, 1:], sd_sae)
    a, b = [int(j) for j in i[v > 0].bincount().argsort(descending=True)[:2]]
    peak = {j: float(v[i == j].max().detach()) for j in (a, b)}
    base = embeds(sd)[0]
    # a's threshold above its peak (a alone never opens the gate), b's below (b opens it): edited
    with snce_fast.patched(sd, sd_sae, [b, a], gate=True, threshold=[peak[b] / 2, peak[a] + 1]):
        opened = embeds(sd)[0]
    # both above their peaks: the gate stays shut, bit-identical
    with snce_fast.patched(sd, sd_sae, [b, a], gate=True, threshold=[peak[b] + 1, peak[a] + 1]):
        shut = embeds(sd)[0]
    with snce_fast.patched(sd, sd_sae, [a, b], gate=False):
        ungated = embeds(sd)[0]
    assert torch.equal(shut, base)
    assert not torch.equal(opened, base)
    torch.testing.assert_close(opened, ungated, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one per"):
        snce_fast.patch(sd, sd_sae, [a, b], gate=True, threshold=[0.1])
