"""replace_mlp_with_moe on tiny LLaMA and GPT-2 models built from configs (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels.moe.hf import MoEMLP
from tests.helpers import BACKENDS, DEVICE

transformers = pytest.importorskip("transformers")

PAD = 0


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE).eval()


def moe_model(kind):
    if kind == "llama":
        return gk.replace_mlp_with_moe(tiny_llama(), num_experts=4, num_clusters=3, top_k=2)
    return gk.replace_mlp_with_moe(tiny_gpt2(), num_experts=4, num_clusters=3, top_k=2, init="random")


def left_padded(prompts):
    """Batch of token lists, left-padded, with the attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    return ids, mask


PROMPTS = [[5, 9, 14, 3, 22, 7], [11, 4, 8], [30, 31, 6, 12, 40]]
CLUSTERS = [2, 0, 1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_backward_with_mixed_cluster_ids(kind):
    model = moe_model(kind).train()
    ids, mask = left_padded(PROMPTS)
    clusters = torch.tensor(CLUSTERS, device=DEVICE)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, cluster_ids=clusters)
    out.loss.backward()
    moes = [m for m in model.modules() if isinstance(m, gk.ClusterGatedMoE)]
    assert len(moes) == 2
    for moe in moes:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.parameters())
    assert gk.collect_aux_loss(model) is not None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cluster_ids_change_the_output(kind):
    model = moe_model(kind)
    ids, mask = left_padded(PROMPTS)
    a = model(input_ids=ids, attention_mask=mask, cluster_ids=torch.tensor([0, 0, 0], device=DEVICE)).logits
    b = model(input_ids=ids, attention_mask=mask, cluster_ids=torch.tensor([1, 1, 1], device=DEVICE)).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_missing_cluster_ids_is_a_clear_error(kind):
    model = moe_model(kind)
    with pytest.raises(ValueError, match="pass cluster_ids=ids"):
        model(input_ids=torch.tensor([[3, 4]], device=DEVICE))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_greedy_generation_equals_one_by_one(kind):
    model = moe_model(kind)
    ids, mask = left_padded(PROMPTS)
    batched = model.generate(input_ids=ids, attention_mask=mask, cluster_ids=torch.tensor(CLUSTERS, device=DEVICE),
                             max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    for row, (prompt, cluster) in enumerate(zip(PROMPTS, CLUSTERS, strict=True)):
        single = model.generate(input_ids=torch.tensor([prompt], device=DEVICE),
                                cluster_ids=torch.tensor([cluster], device=DEVICE),
                                max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        assert batched[row, -6:].tolist() == single[0, -6:].tolist(), f"row {row}"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_beams_and_return_sequences_follow_their_cluster(kind):
    model = moe_model(kind)
    ids, mask = left_padded(PROMPTS[:2])
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=PAD,
                  eos_token_id=None)
    both = model.generate(input_ids=ids, attention_mask=mask, cluster_ids=torch.tensor(CLUSTERS[:2], device=DEVICE),
                          **kwargs)
    assert both.shape[0] == 4
    for row in range(2):
        alone = model.generate(input_ids=torch.tensor([PROMPTS[row]], device=DEVICE),
                               cluster_ids=torch.tensor([CLUSTERS[row]], device=DEVICE), **kwargs)
        assert both[2 * row:2 * row + 2, -5:].tolist() == alone[:, -5:].tolist()


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_identical_gradients(kind, use_reentrant):
    model = moe_model(kind).train()
    ids, mask = left_padded(PROMPTS)
    clusters = torch.tensor(CLUSTERS, device=DEVICE)

    calls = []
    for m in model.modules():
        if isinstance(m, gk.ClusterGatedMoE):
            # a pre-hook: non-reentrant recompute stops early, before the layer's forward returns
            m.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(input_ids=ids, attention_mask=mask, labels=ids, cluster_ids=clusters).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert len(calls) == 2  # one MoE forward per layer
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    checkpointed = grads()
    assert len(calls) == 4, "the backward pass did not recompute the MoE layers"
    assert plain.keys() == checkpointed.keys() and any("moe" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gpt2_dense_split_says_to_use_random_init():
    with pytest.raises(ValueError, match="use init='random'"):
        gk.replace_mlp_with_moe(tiny_gpt2(), num_experts=4, num_clusters=2)


def test_bad_replace_arguments():
    with pytest.raises(ValueError, match="init must be one of"):
        gk.replace_mlp_with_moe(tiny_llama(), 4, 2, init="zeros")
    with pytest.raises(ValueError, match="intermediate_size must be None or"):
        gk.replace_mlp_with_moe(tiny_llama(), 4, 2, intermediate_size=7)
    with pytest.raises(ValueError, match="must divide the dense intermediate size 48"):
        gk.replace_mlp_with_moe(tiny_llama(), 5, 2)
    with pytest.raises(ValueError, match="found no LLaMA-style"):
        gk.replace_mlp_with_moe(torch.nn.Linear(3, 3), 4, 2)
    with pytest.raises(ValueError, match="already cluster-gated"):
        gk.replace_mlp_with_moe(moe_model("llama"), 4, 2)


def test_dense_split_keeps_the_dense_function_when_all_experts_fire():
    """k = E with unnormalised weights of 1 would be the dense MLP; with the default routing
    the first layer's MoE is the dense MLP reweighted, checked here on the raw experts."""
    model = tiny_llama()
    dense_mlp = model.model.layers[0].mlp
    x = torch.randn(5, 32, device=DEVICE)
    want = dense_mlp(x)
    gk.replace_mlp_with_moe(model, num_experts=4, num_clusters=2)
    moe = model.model.layers[0].mlp.moe
    every = torch.arange(4, device=DEVICE).expand(5, 4)
    torch.testing.assert_close(gk.moe_experts(x, torch.ones(5, 4, device=DEVICE), every, moe.w_gate_up, moe.w_down),
                               want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_restore_dense_mlp_is_the_way_back(kind):
    model = tiny_llama() if kind == "llama" else tiny_gpt2()
    ids = torch.tensor([[3, 9, 4, 12]], device=DEVICE)
    before = model(input_ids=ids).logits
    base_class = type(model)
    gk.replace_mlp_with_moe(model, 4, 2, init="random")
    assert any(isinstance(m, MoEMLP) for m in model.modules())
    gk.restore_dense_mlp(model)
    assert type(model) is base_class and not any(isinstance(m, MoEMLP) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_pretrained_then_patch_and_load_gives_the_same_model(tmp_path, kind):
    """The README's recipe: save_pretrained writes the MoE weights (and not the dense MLPs kept
    for restore_dense_mlp); the base class loads it, replace_mlp_with_moe with the same sizes and
    init='random' makes room, and load_state_dict fills every parameter (strict=False only for a
    tied output head, which the file does not repeat)."""
    safetensors = pytest.importorskip("safetensors.torch")
    model = moe_model(kind)
    with torch.no_grad():  # trained-looking gates, so the reload is not equal by its init
        for module in model.modules():
            if isinstance(module, gk.ClusterGatedMoE):
                module.gate_weight.normal_()
    ids, mask = left_padded(PROMPTS)
    clusters = torch.tensor(CLUSTERS, device=DEVICE)
    want = model(input_ids=ids, attention_mask=mask, cluster_ids=clusters).logits
    model.save_pretrained(tmp_path)
    saved = safetensors.load_file(tmp_path / "model.safetensors")
    assert any(".moe.w_gate_up" in k for k in saved) and not any(".mlp.down_proj" in k or ".mlp.c_fc" in k
                                                                for k in saved)
    base_class = transformers.LlamaForCausalLM if kind == "llama" else transformers.GPT2LMHeadModel
    loaded = base_class.from_pretrained(tmp_path).to(DEVICE).eval()  # the base class, as the README says
    gk.replace_mlp_with_moe(loaded, num_experts=4, num_clusters=3, top_k=2, init="random")
    missing, unexpected = loaded.load_state_dict(saved, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if kind == "gpt2" else []), (missing, unexpected)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight or kind == "llama"
    got = loaded(input_ids=ids, attention_mask=mask, cluster_ids=clusters).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not runnable here")
def test_llama_on_the_triton_backend_matches_torch():
    model = moe_model("llama")
    ids, mask = left_padded(PROMPTS)
    clusters = torch.tensor(CLUSTERS, device=DEVICE)
    with gk.use_backend("torch"):
        want = model(input_ids=ids, attention_mask=mask, cluster_ids=clusters).logits
    with gk.use_backend("triton"):
        got = model(input_ids=ids, attention_mask=mask, cluster_ids=clusters).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_with_static_cache_under_torch_compile(backend):
    """Decoding as users speed it up: Hugging Face's static cache and torch.compile(mode=
    "reduce-overhead", fullgraph=True), which captures CUDA graphs on a GPU. No graph break (fullgraph),
    and the same tokens as eager generation."""
    model = moe_model("llama")
    for moe in model.modules():
        if isinstance(moe, gk.ClusterGatedMoE):
            moe.backend = backend
    ids, mask = left_padded(PROMPTS[:2])
    clusters = torch.tensor(CLUSTERS[:2], device=DEVICE)
    kwargs = dict(attention_mask=mask, cluster_ids=clusters, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    eager = model.generate(ids, **kwargs)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    assert torch.equal(model.generate(ids, **kwargs), eager)
