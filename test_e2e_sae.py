"""Tests for e2e_sae.py: offline, on tiny random models, each against an independent computation.

Run: python -m pytest -q test_e2e_sae.py
"""

import bdb
import io
import itertools
import json
import logging
import math
import os
import pdb
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import e2e_sae as E

HERE = Path(__file__).parent
METRIC_KEYS = {"ce_loss_orig", "ce_loss_sae", "ce_loss_increase", "kl", "l0", "alive_dict_elements",
               "explained_variance", "mse", "top1_agreement", "downstream_mse", "n_eval_tokens"}
OUTPUT_FILES = {"sae.safetensors", "config.json", "metrics.json", "log.jsonl", "cfg.json", "sae_weights.safetensors"}


@pytest.fixture(scope="module")
def tiny():
    model = E.tiny_gpt2().eval().requires_grad_(False)
    return model, E.decoder_blocks(model)


def identity_sae(d_model: int) -> E.SAE:
    """F = 2D, encoder [I; −I], decoder [I, −I], zero biases: c = (a⁺, a⁻), â = a⁺ − a⁻ = a exactly."""
    sae = E.SAE(d_model, 2 * d_model)
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye], 0))  # (2D, D)
        sae.decoder.weight.copy_(torch.cat([eye, -eye], 1))  # (D, 2D), columns already unit norm
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    return sae


def tokens_for(model, B=2, T=16, seed=0):
    return torch.randint(model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def cfg_for(loss, layer, **kw):
    return E.Config(model="tiny", dataset="random", loss=loss, layer=layer, device="cpu", **kw)


# -----------------------------------------------------------------------------
# 1. The identity dictionary changes nothing: KL = 0, CE increase = 0, downstream MSE = 0


@pytest.mark.parametrize("layer", [0, 6, 11])
def test_identity_dictionary_gives_zero_kl(tiny, layer):
    model, blocks = tiny
    sae = identity_sae(model.config.n_embd)
    tokens = tokens_for(model)
    phi = 0.1
    for loss in ("local", "e2e", "e2e_ds"):
        if loss == "e2e_ds" and layer == len(blocks) - 1:
            continue  # no downstream layer (refused by setup(), tested below)
        cfg = cfg_for(loss, layer, sparsity_coeff=phi * model.config.n_embd)
        total, terms, c = E.compute_loss(cfg, model, blocks, sae, tokens)
        expected_sparsity = phi * c.sum(-1).mean()  # = φ · mean ‖a‖₁
        assert torch.allclose(terms["sparsity"], expected_sparsity)
        assert torch.allclose(total, expected_sparsity, atol=1e-6), (loss, terms)
        for name, value in terms.items():
            if name != "sparsity":
                assert abs(value.item()) < 1e-6, (loss, name, value)
    m = E.evaluate(model, blocks, sae, tokens_for(model, B=3, T=16, seed=1), layer, batch_size=2)
    assert abs(m["kl"]) < 1e-6 and abs(m["ce_loss_increase"]) < 1e-6
    assert m["top1_agreement"] == 1.0 and m["mse"] == 0.0 and m["explained_variance"] == 1.0
    assert set(m["downstream_mse"]) == set(range(layer + 1, len(blocks)))
    assert all(v == 0.0 for v in m["downstream_mse"].values())
    assert m["n_eval_tokens"] == 3 * 16


def test_bf16_autocast_keeps_logits_fp32_and_identity_close():
    model = E.tiny_gpt2().eval().requires_grad_(False)
    E.fp32_logits(model)
    blocks = E.decoder_blocks(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert model(tokens_for(model)).logits.dtype == torch.float32
        assert blocks[0].attn.c_attn(torch.randn(2, 64)).dtype == torch.bfloat16  # the blocks do run in bf16
    m = E.evaluate(model, blocks, identity_sae(64), tokens_for(model), 6, batch_size=2,
                   autocast=partial(torch.autocast, "cpu", dtype=torch.bfloat16))
    assert 0 <= m["kl"] < 0.05 and m["explained_variance"] > 0.99


def test_evaluate_matches_independent_computations(tiny):
    """A random SAE at layer 3, 5 sequences in batches of 2: every metric against a computation that
    uses HF's own loss and hidden_states instead of our hooks and sums."""
    model, blocks = tiny
    L, tokens = 3, tokens_for(model, B=5, T=12, seed=3)
    torch.manual_seed(0)
    sae = identity_sae(64)  # perturbed, so that the output changes but not beyond recognition
    with torch.no_grad():
        sae.decoder.weight.add_(0.03 * torch.randn(64, 128))
        sae.decoder.bias.add_(0.1 * torch.randn(64))
        sae.encoder.bias[:10] = -100.0  # these elements never fire
    m = E.evaluate(model, blocks, sae, tokens, L, batch_size=2)

    with torch.no_grad():
        clean = model(tokens, labels=tokens, output_hidden_states=True)
        a = clean.hidden_states[L]
        a_hat, c = sae(a)
        with E.splice_sae(blocks[L], sae):
            spliced = model(tokens, labels=tokens, output_hidden_states=True)
    p, q = clean.logits.log_softmax(-1), spliced.logits.log_softmax(-1)
    a, a_hat = a.double().numpy().reshape(-1, 64), a_hat.double().numpy().reshape(-1, 64)
    expected = {
        "ce_loss_orig": clean.loss.item(),  # HF shifts the labels: mean over the B·(T−1) predictions
        "ce_loss_sae": spliced.loss.item(),
        "ce_loss_increase": spliced.loss.item() - clean.loss.item(),
        "kl": (p.exp() * (p - q)).sum(-1).mean().item(),
        "l0": (c > 0).float().sum(-1).mean().item(),
        "alive_dict_elements": int((c > 0).reshape(-1, 128).any(0).sum()),
        "explained_variance": 1 - ((a - a_hat) ** 2).sum() / ((a - a.mean(0)) ** 2).sum(),
        "mse": ((a - a_hat) ** 2).mean(),
        "top1_agreement": (clean.logits.argmax(-1) == spliced.logits.argmax(-1)).float().mean().item(),
        "n_eval_tokens": 5 * 12,
    }
    assert 0 < expected["alive_dict_elements"] <= 118 and 0 < expected["top1_agreement"] < 1
    assert set(m) == METRIC_KEYS
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for k in range(L + 1, 12):
        d = (spliced.hidden_states[k] - clean.hidden_states[k]).double()
        assert m["downstream_mse"][k] == pytest.approx(d.pow(2).mean().item(), rel=1e-4), k


def test_hub_reachable_probes_the_endpoint(monkeypatch):
    import socket
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"https://127.0.0.1:{server.getsockname()[1]}")
        assert E.hub_reachable()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # never resolves
    assert not E.hub_reachable()
    monkeypatch.setattr(E, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent")
    with pytest.raises(E.UserError, match="unreachable.*--model tiny --dataset random"):
        next(E.read_rows("some-org/some-dataset"))


# -----------------------------------------------------------------------------
# 2. The hooks read exactly HF's hidden_states[L] and leave nothing behind


@pytest.mark.parametrize("layer", [0, 5, 11])
def test_hook_sees_hidden_states_and_cleans_up(tiny, layer):
    model, blocks = tiny
    tokens = tokens_for(model)
    with torch.no_grad():
        clean = model(tokens, output_hidden_states=True)
        with E.record_resid(blocks, [layer]) as resid:
            model(tokens)
        assert torch.equal(resid[layer], clean.hidden_states[layer])
        sae = E.SAE(model.config.n_embd, 128)
        with E.splice_sae(blocks[layer], sae) as seen:
            spliced = model(tokens).logits
        assert torch.equal(seen.a, clean.hidden_states[layer])
        assert torch.equal(seen.a_hat, sae(seen.a)[0]) and torch.equal(seen.c, sae(seen.a)[1])
        assert not torch.allclose(spliced, clean.logits)  # the splice did change the output
        after = model(tokens).logits
    assert torch.equal(after, clean.logits)
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)


def test_hooks_are_removed_when_the_forward_pass_fails(tiny):
    model, blocks = tiny
    with pytest.raises(E.StopForward):
        with E.record_resid(blocks, [3], stop_at=3), E.splice_sae(blocks[2], E.SAE(64, 8)):
            model(tokens_for(model))
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)


def test_splice_reaches_the_output_with_the_reconstruction(tiny):
    """Replacing hidden_states[L] by hand (running the blocks ourselves) gives the spliced logits."""
    model, blocks = tiny
    tokens, L = tokens_for(model), 4
    sae = E.SAE(64, 256)
    with torch.no_grad():
        h = model(tokens, output_hidden_states=True).hidden_states[L]
        x = sae(h)[0]
        for block in blocks[L:]:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
        by_hand = model.lm_head(model.transformer.ln_f(x))
        with E.splice_sae(blocks[L], sae):
            spliced = model(tokens).logits
    assert torch.allclose(spliced, by_hand, atol=1e-5)


# -----------------------------------------------------------------------------
# 3. Each loss equals a hand computation with explicit sums


def kl_by_hand(logits_p, logits_q):
    """KL(P ‖ Q) averaged over positions, with explicit loops."""
    total, n = 0.0, 0
    for b in range(logits_p.shape[0]):
        for t in range(logits_p.shape[1]):
            zp = sum(math.exp(x) for x in logits_p[b, t].tolist())
            zq = sum(math.exp(x) for x in logits_q[b, t].tolist())
            for xp, xq in zip(logits_p[b, t].tolist(), logits_q[b, t].tolist()):
                p, q = math.exp(xp) / zp, math.exp(xq) / zq
                total += p * (math.log(p) - math.log(q))
            n += 1
    return total / n


def mse_by_hand(x, y):
    flat = [(u - v) ** 2 for u, v in zip(x.flatten().tolist(), y.flatten().tolist())]
    return sum(flat) / len(flat)


def l1_by_hand(c):
    rows = c.reshape(-1, c.shape[-1]).tolist()
    return sum(sum(abs(v) for v in row) for row in rows) / len(rows)


def test_kl_direction_is_orig_to_sae():
    # P_orig peaked, P_sae flat: KL(orig ‖ sae) and KL(sae ‖ orig) differ a lot.
    logits_orig = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 3.0, -1.0]]])  # (B=1, T=2, V=3)
    logits_sae = torch.tensor([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    forward, backward = kl_by_hand(logits_orig, logits_sae), kl_by_hand(logits_sae, logits_orig)
    assert abs(forward - backward) > 0.2
    assert E.kl_div(logits_orig, logits_sae).item() == pytest.approx(forward, rel=1e-5)


def test_losses_equal_hand_computations():
    g = torch.Generator().manual_seed(0)
    B, T, D, Fd, V = 2, 3, 4, 6, 5
    a, a_hat = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    c = torch.relu(torch.randn(B, T, Fd, generator=g))
    lo, ls = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    resid_orig = [torch.randn(B, T, D, generator=g) for _ in range(3)]
    resid_sae = [torch.randn(B, T, D, generator=g) for _ in range(3)]
    lam = 2.0
    phi = lam / D

    loss, terms = E.local_loss(a, a_hat, c, phi)
    assert loss.item() == pytest.approx(mse_by_hand(a_hat, a) + phi * l1_by_hand(c), rel=1e-5)
    assert terms["mse"].item() == pytest.approx(mse_by_hand(a_hat, a), rel=1e-5)

    loss, terms = E.e2e_loss(E.kl_div(lo, ls), c, phi)
    assert loss.item() == pytest.approx(kl_by_hand(lo, ls) + phi * l1_by_hand(c), rel=1e-5)

    beta = 2.5
    ds_by_hand = sum(mse_by_hand(s, o) for s, o in zip(resid_sae, resid_orig)) / 3
    loss, terms = E.e2e_ds_loss(E.kl_div(lo, ls), c, resid_orig, resid_sae, phi, beta)
    assert loss.item() == pytest.approx(0.5 * kl_by_hand(lo, ls) + phi * l1_by_hand(c) + beta * ds_by_hand, rel=1e-5)
    assert terms["downstream"].item() == pytest.approx(ds_by_hand, rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 100])
def test_unembed_kl_equals_kl_of_full_logits_and_its_gradient(chunk_rows):
    """The chunked KL from hidden states: the same value as kl_div of the full logits (and as the
    explicit sums), and the same gradient w.r.t. h_sae as autograd through the full logits."""
    g = torch.Generator().manual_seed(1)
    B, T, D, V = 2, 5, 4, 7
    unembed = torch.nn.Linear(D, V)
    with torch.no_grad():
        unembed.weight.copy_(torch.randn(V, D, generator=g))
        unembed.bias.copy_(torch.randn(V, generator=g))
    unembed.requires_grad_(False)
    h_orig = torch.randn(B, T, D, generator=g)
    h_sae = torch.randn(B, T, D, generator=g, requires_grad=True)
    h_ref = h_sae.detach().clone().requires_grad_(True)
    kl = E.unembed_kl(h_orig, h_sae, unembed, chunk_rows)
    (3.0 * kl).backward()
    ref = E.kl_div(unembed(h_orig), unembed(h_ref))
    (3.0 * ref).backward()
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl.item() == pytest.approx(kl_by_hand(unembed(h_orig), unembed(h_ref)), rel=1e-5)
    assert torch.allclose(h_sae.grad, h_ref.grad, atol=1e-6)


def test_compute_loss_uses_phi_equals_lambda_over_d(tiny):
    """The training step's sparsity term is (λ / D) · mean ‖c‖₁ with D the model width."""
    model, blocks = tiny
    cfg = cfg_for("local", 3, sparsity_coeff=6.4)
    sae = E.SAE(64, 256)
    _, terms, c = E.compute_loss(cfg, model, blocks, sae, tokens_for(model))
    assert terms["sparsity"].item() == pytest.approx(0.1 * l1_by_hand(c.detach()), rel=1e-5)  # 6.4 / 64


# -----------------------------------------------------------------------------
# 4. The SAE: unit-norm dictionary, and the saved file reproduces it


def test_decoder_columns_have_unit_norm_after_training_steps():
    sae = E.SAE(16, 64)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for _ in range(5):
        a_hat, c = sae(torch.randn(4, 8, 16))
        (a_hat.pow(2).sum() + c.sum()).backward()
        opt.step()
        opt.zero_grad()
    raw_norms = sae.decoder.weight.norm(dim=0)
    assert not torch.allclose(raw_norms, torch.ones(64))  # the raw weight drifted ...
    assert torch.allclose(sae.dictionary.norm(dim=0), torch.ones(64), atol=1e-6)  # ... D_n did not


def test_orthogonal_decoder_init():
    sae = E.SAE(16, 64)
    W = sae.decoder.weight  # (D, F): its rows are orthonormal
    assert torch.allclose(W @ W.T, torch.eye(16), atol=1e-5)


def test_saved_sae_reproduces_the_module(tmp_path):
    torch.manual_seed(0)
    sae = E.SAE(16, 48)
    with torch.no_grad():
        sae.decoder.weight.mul_(3.0)  # columns no longer unit norm in the raw weight
        sae.decoder.bias.normal_()
    E.save_sae(sae, tmp_path / "sae.safetensors")
    t = load_file(str(tmp_path / "sae.safetensors"))
    assert set(t) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert t["W_enc"].shape == (16, 48) and t["b_enc"].shape == (48,)
    assert t["W_dec"].shape == (48, 16) and t["b_dec"].shape == (16,)
    assert torch.allclose(t["W_dec"].norm(dim=1), torch.ones(48), atol=1e-6)
    a = torch.randn(3, 5, 16)
    with torch.no_grad():
        a_hat, c = sae(a)
        by_formula = torch.relu(a @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"]
        loaded, cfg = E.load_sae(tmp_path)
        assert cfg is None
        assert torch.allclose(by_formula, a_hat, atol=1e-5)
        assert torch.allclose(loaded(a)[0], a_hat, atol=1e-5) and torch.allclose(loaded(a)[1], c, atol=1e-6)


def test_load_sae_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(E.UserError, match="no sae.safetensors"):
        E.load_sae(tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(E.UserError, match="not a valid SAE file"):
        E.load_sae(tmp_path)


# -----------------------------------------------------------------------------
# 5. local runs nothing after block L


def modules_run_by_compute_loss(model, blocks, loss, L):
    """The blocks (by index) and "lm_head", in the order compute_loss runs them."""
    calls = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(blocks)]
    handles.append(model.lm_head.register_forward_hook(lambda m, i, o: calls.append("lm_head")))
    try:
        E.compute_loss(cfg_for(loss, L), model, blocks, E.SAE(64, 128), tokens_for(model))
    finally:
        for h in handles:
            h.remove()
    return calls


def test_local_runs_no_block_after_layer(tiny):
    L = 4
    calls = modules_run_by_compute_loss(*tiny, "local", L)
    assert calls == list(range(L))  # blocks 0 … L−1 only: not block L, nothing after, no unembedding


# -----------------------------------------------------------------------------
# 6. Training reduces each loss on a fixed batch


@pytest.mark.parametrize("loss", ["local", "e2e", "e2e_ds"])
def test_a_few_dozen_steps_reduce_the_loss(tiny, loss):
    model, blocks = tiny
    torch.manual_seed(0)
    cfg = cfg_for(loss, 5, sparsity_coeff=0.5)
    sae = E.SAE(64, 256)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    tokens = tokens_for(model, B=2, T=32)
    history = []
    for _ in range(30):
        total, terms, _ = E.compute_loss(cfg, model, blocks, sae, tokens)
        total.backward()
        opt.step()
        opt.zero_grad()
        history.append({k: v.item() for k, v in {"total": total, **terms}.items()})
    first, last = history[0], history[-1]
    assert last["total"] < 0.7 * first["total"], (first, last)
    main_term = {"local": "mse", "e2e": "kl", "e2e_ds": "downstream"}[loss]
    assert last[main_term] < first[main_term], (first, last)  # not only the sparsity term went down


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's compiler
def test_compiled_step_matches_eager(monkeypatch):
    """compile_forwards: the compiled blocks and SAE, with our hooks around them, give the eager step.
    Dynamo traces and AOTAutograd splits forward and backward as in a real run; the code generation
    (inductor) is left out, since on a new machine its first compilation builds C++ for 15 s."""
    graphs, aot_eager = [], torch._dynamo.lookup_backend("aot_eager")

    def backend(graph, example_inputs):  # aot_eager, counting what it is given
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=backend))
    model = E.tiny_gpt2().eval().requires_grad_(False)  # a fresh model: compiling changes it for good
    blocks = E.decoder_blocks(model)
    cfg = cfg_for("e2e_ds", 5)
    torch.manual_seed(0)
    sae = E.SAE(64, 256)
    tokens = tokens_for(model)
    results = []
    for compiled in (False, True):
        if compiled:
            E.compile_forwards(sae, *blocks)
        loss, _, _ = E.compute_loss(cfg, model, blocks, sae, tokens)
        loss.backward()
        results.append((loss.item(), sae.encoder.weight.grad.clone()))
        sae.zero_grad()
    assert len(graphs) >= 2  # the SAE's forward and the blocks' were compiled
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)

# -----------------------------------------------------------------------------
# 7. The fast training path equals the plain computation


def reference_loss(cfg, model, blocks, sae, tokens):
    """The e2e losses computed the plain way, as evaluate() does: two whole forward passes, the SAE
    hooked in, full (B, T, V) logits, kl_div."""
    L, phi = cfg.layer, cfg.sparsity_coeff / sae.encoder.in_features
    ds = range(L + 1, len(blocks)) if cfg.loss == "e2e_ds" else []
    with torch.no_grad(), E.record_resid(blocks, ds) as resid_orig:
        logits_orig = model(tokens).logits
    with E.splice_sae(blocks[L], sae) as seen, E.record_resid(blocks, ds) as resid_sae:
        logits_sae = model(tokens).logits
    kl = E.kl_div(logits_orig, logits_sae)
    if cfg.loss == "e2e":
        return E.e2e_loss(kl, seen.c, phi, cfg.kl_coeff)
    return E.e2e_ds_loss(kl, seen.c, [resid_orig[k] for k in ds], [resid_sae[k] for k in ds], phi,
                         cfg.downstream_coeff, cfg.kl_coeff)


def other_models():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100))
    # Layers that differ: blocks 2 and 3 attend over a sliding window of 8 positions, 0 and 1 over all.
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=300, use_sliding_window=True,
                                        sliding_window=8, max_window_layers=2))
    # Alternating sliding-window and global layers, each kind with its own rotary embeddings.
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                               vocab_size=300, sliding_window=8, sliding_window_pattern=2))
    return {"llama": llama, "neox": neox, "qwen": qwen, "gemma": gemma}


@pytest.mark.parametrize("arch, loss, layer", [("gpt2", "e2e", 5), ("gpt2", "e2e_ds", 0), ("gpt2", "e2e_ds", 10),
                                               ("llama", "e2e_ds", 1), ("neox", "e2e", 2), ("qwen", "e2e_ds", 1),
                                               ("gemma", "e2e", 0)])
def test_fast_path_matches_the_plain_computation(tiny, arch, loss, layer):
    """Numerical guard for compute_loss (the spliced run resumed at block L, the chunked KL from hidden
    states, bf16 autocast) against reference_loss in fp32. Tolerances:
      fp32 fast path: every loss term and every gradient within 1e-5 relative;
      bf16 autocast:  every loss term within 1% and each gradient's relative error ‖g − g_ref‖ / ‖g_ref‖
                      below 5% (measured on this model: terms ≤ 0.1%, gradients ≤ 1.6%)."""
    model = tiny[0] if arch == "gpt2" else other_models()[arch].eval().requires_grad_(False)
    blocks, D = E.decoder_blocks(model), model.config.hidden_size
    cfg = cfg_for(loss, layer)
    torch.manual_seed(0)
    sae = E.SAE(D, 4 * D)
    with torch.no_grad():
        sae.encoder.bias.add_(0.3)  # more active elements: a KL well away from 0
    tokens = tokens_for(model, B=2, T=64)
    ref_loss, ref_terms = reference_loss(cfg, model, blocks, sae, tokens)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in sae.parameters()]
    assert ref_terms["kl"] > 1e-3
    for bf16, rel in ((False, 1e-5), (True, 1e-2)):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, terms, _ = E.compute_loss(cfg, model, blocks, sae, tokens, kl_chunk_rows=37)  # 37 ∤ 128: a ragged chunk
        loss.backward()
        assert all(p.grad is None for p in model.parameters())  # the frozen model gets no gradient
        for k in ref_terms:
            assert terms[k].item() == pytest.approx(ref_terms[k].item(), rel=rel), (k, bf16)
        for p, g_ref in zip(sae.parameters(), ref_grads):
            assert (p.grad - g_ref).norm() / g_ref.norm() < (5e-2 if bf16 else 1e-5), bf16


def test_spliced_run_starts_at_block_L_and_builds_no_logits(tiny):
    L = 7
    calls = modules_run_by_compute_loss(*tiny, "e2e", L)
    assert calls == list(range(12)) + list(range(L, 12))  # the clean run, then blocks L … 11 once more


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_training_step_never_makes_a_batch_by_vocabulary_tensor(tiny):
    model, blocks = tiny
    B, T, V = 2, 64, model.config.vocab_size
    sae, tokens = E.SAE(64, 128), tokens_for(model, B=B, T=T)  # F = 128 < V: the code c is smaller than (B, T, V)
    for loss in ("e2e", "e2e_ds"):
        with LargestTensor() as probe:
            E.compute_loss(cfg_for(loss, 4), model, blocks, sae, tokens, kl_chunk_rows=16)[0].backward()
        assert probe.numel < B * T * V and probe.numel >= 16 * V, probe.numel
        with LargestTensor() as probe:  # the probe does see the plain computation's logits
            reference_loss(cfg_for(loss, 4), model, blocks, sae, tokens)[0].backward()
        assert probe.numel >= B * T * V


@pytest.mark.parametrize("loss", ["local", "e2e", "e2e_ds"])
def test_flops_per_token_equals_torch_flop_counter(loss):
    """flops_per_token, derived from the shapes, equals what torch's FlopCounterMode counts in one real
    forward and backward (eager attention, whose matmuls the counter sees on the CPU)."""
    model = E.tiny_gpt2().eval().requires_grad_(False)
    model.config._attn_implementation = "eager"
    blocks, sae, tokens = E.decoder_blocks(model), E.SAE(64, 320), tokens_for(model, B=2, T=48)
    with FlopCounterMode(display=False) as counter:
        E.compute_loss(cfg_for(loss, 5), model, blocks, sae, tokens)[0].backward()
    assert counter.get_total_flops() == E.flops_per_token(model, blocks, sae, loss, 5, 48) * tokens.numel()


def test_benchmark_defaults():
    cpu = E.parse_config(["--benchmark", "--device", "cpu"])
    assert (cpu.model, cpu.dataset, cpu.loss, cpu.layer, cpu.dict_ratio) == ("gpt2-random", "random", "e2e", 6, 60)
    assert (cpu.batch_size, cpu.n_ctx, cpu.grad_accum, cpu.bench_warmup, cpu.bench_steps) == (1, 128, 1, 1, 3)
    gpu = E.parse_config(["--benchmark", "--device", "cuda", "--loss", "local"])
    assert (gpu.batch_size, gpu.n_ctx, gpu.grad_accum, gpu.bench_warmup, gpu.bench_steps) == (8, 1024, 1, 3, 10)
    mine = E.parse_config(["--benchmark", "--device", "cpu", "--model", "tiny", "--n-ctx", "64", "--bench-steps", "5"])
    assert (mine.model, mine.n_ctx, mine.bench_steps, mine.batch_size) == ("tiny", 64, 5, 1)


def test_benchmark_runs_on_cpu_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # GPT-2 small's blocks (a dictionary of 4 × 768 rather than 60 × 768, to take seconds, not ten)
    E.main(["--benchmark", "--device", "cpu", "--bench-warmup", "0", "--bench-steps", "1", "--dict-ratio", "4",
            "--n-ctx", "32"])
    out = capsys.readouterr().out
    assert "gpt2-random (D=768, F=3072)" in out and "MFU: n/a" in out
    for loss in ("local", "e2e_ds"):
        result = E.benchmark(E.parse_config(["--benchmark", "--device", "cpu", "--model", "tiny", "--loss", loss]))
        assert result["tokens_per_s"] > 0 and result["mfu"] is None and result["peak_memory_gib"] is None
        assert result["tflops_per_s"] == pytest.approx(result["tokens_per_s"] * result["flops_per_token"] / 1e12)
    assert f"tokens/s {result['tokens_per_s']:,.0f}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_training_log_has_tokens_per_s_and_mfu_where_the_peak_is_known(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "peak_flops", lambda device, dtype: 1e12)  # pretend this CPU has a known peak
    cfg = E.parse_config(["--model", "tiny", "--n-samples", "64", "--log-every", "2", "--out-dir", str(tmp_path)])
    E.train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "tokens_per_s" in l]
    assert len(train_lines) == 2  # 4 steps, one line every 2
    model = E.tiny_gpt2()
    flops = E.flops_per_token(model, E.decoder_blocks(model), E.SAE(64, 3840), "e2e", 6, 128)
    for l in train_lines:
        assert l["tokens_per_s"] > 0 and l["mfu"] == pytest.approx(l["tokens_per_s"] * flops / 1e12)


def test_models_use_fused_attention(tmp_path):
    assert E.load_model("tiny", torch.device("cpu"))[0].config._attn_implementation == "sdpa"
    E.tiny_gpt2().save_pretrained(tmp_path / "m")
    assert E.load_model(str(tmp_path / "m"), torch.device("cpu"))[0].config._attn_implementation == "sdpa"


# -----------------------------------------------------------------------------
# Data: sources, packing, the held-out evaluation set


def write_sources(tmp_path, rows):
    """The same pre-tokenised rows as a save_to_disk folder, a .jsonl and a .parquet file."""
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    ds.save_to_disk(str(tmp_path / "disk"))
    ds.to_json(str(tmp_path / "rows.jsonl"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    return [str(tmp_path / "disk"), str(tmp_path / "rows.jsonl"), str(tmp_path / "rows.parquet")]


@pytest.mark.parametrize("streamed", [False, True])
def test_eval_and_training_sequences_never_overlap(tmp_path, monkeypatch, streamed):
    """Local sources are held in memory; hub sources are streamed through a buffer and re-opened when
    they run out. Streaming is checked here on the same local files."""
    monkeypatch.setattr(E, "is_streamed", lambda dataset: streamed)
    # Row i is [i, i+1, ...]: every row is distinct. Rows of other lengths show cutting and skipping.
    n_ctx = 8
    rows = [list(range(i, i + n_ctx + i % 3)) for i in range(40)]  # lengths 8, 9, 10: all usable
    rows.insert(5, [1, 2, 3])  # too short: skipped
    expected = [tuple(r[:n_ctx]) for r in rows if len(r) >= n_ctx]
    for source in write_sources(tmp_path, rows):
        cfg = E.Config(model="tiny", dataset=source, n_ctx=n_ctx, eval_samples=10, shuffle_buffer=7, device="cpu")
        eval_tokens, train = E.load_data(cfg, None, vocab_size=512)
        assert [tuple(r) for r in eval_tokens.tolist()] == expected[:10], source
        seen = [tuple(next(train).tolist()) for _ in range(3 * 30)]  # three passes over the 30 others
        assert not set(seen) & set(expected[:10]), source
        assert sorted(seen[:30]) == sorted(expected[10:]), source  # each epoch: every training row once
        assert sorted(seen[30:60]) == sorted(expected[10:]), source
        assert seen[:30] != expected[10:] and seen[:30] != seen[30:60]  # shuffled, differently per epoch
        if not streamed:  # a whole shuffle: rows from the end of the file can come first
            assert any(row[0] >= 30 for row in seen[:5])


def test_random_source_holds_out_its_first_sequences():
    cfg = E.Config(model="tiny", dataset="random", n_ctx=16, eval_samples=5, shuffle_buffer=4, device="cpu")
    eval_tokens, train = E.load_data(cfg, None, vocab_size=512)
    again, _ = E.load_data(E.Config(**{**cfg.__dict__, "seed": 7}), None, vocab_size=512)
    assert torch.equal(eval_tokens, again)  # the evaluation set does not depend on --seed
    eval_set = {tuple(r) for r in eval_tokens.tolist()}
    assert not eval_set & {tuple(next(train).tolist()) for _ in range(200)}
    assert eval_tokens.max() < 512


@pytest.mark.parametrize("streamed", [False, True])
def test_training_order_is_reproducible_from_the_seed(tmp_path, monkeypatch, streamed):
    monkeypatch.setattr(E, "is_streamed", lambda dataset: streamed)
    source = write_sources(tmp_path, [list(range(i, i + 4)) for i in range(50)])[0]
    def order(seed):
        cfg = E.Config(model="tiny", dataset=source, n_ctx=4, eval_samples=5, shuffle_buffer=10, seed=seed)
        _, train = E.load_data(cfg, None, 512)
        return [next(train)[0].item() for _ in range(45)]
    assert order(1) == order(1)
    assert order(1) != order(2)


def make_tokenizer(folder: Path, texts):
    """A small word-level tokenizer built offline, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>", "<bos>"]))
    # Like Llama's tokenizer, it puts <bos> before every text it encodes (unless told not to).
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    fast.save_pretrained(folder)
    return fast


def test_text_is_tokenised_and_packed_with_eos_between_documents(tmp_path):
    docs = ["the cat sat on the mat", "a dog ran", "the end of the story is near now"]
    tok = make_tokenizer(tmp_path / "tok", docs)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    assert tok(docs[0])["input_ids"][0] == tok.bos_token_id
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # EOS between, no BOS
    n_ctx = 5
    expected = [stream[i:i + n_ctx] for i in range(0, len(stream) - n_ctx + 1, n_ctx)]
    got = [s.tolist() for s in E.token_sequences(E.read_rows(str(tmp_path / "txt")), n_ctx, tok)]
    assert got == expected and len(got) == len(stream) // n_ctx
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert [s.tolist() for s in E.token_sequences(E.read_rows(str(tmp_path / "docs.jsonl")), n_ctx, tok)] == expected


def test_bad_datasets_are_clear_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text("not json\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "binary.txt").write_bytes(bytes(range(256)) * 4)
    tok = make_tokenizer(tmp_path / "tok", ["a b c"])
    for source in ("broken.jsonl", "txt"):
        with pytest.raises(E.UserError, match=f"cannot read dataset '{tmp_path / source}'"):
            E.load_data(E.Config(dataset=str(tmp_path / source), model="tiny", n_ctx=4, eval_samples=1), tok, 512)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"label": 1}) + "\n")
    cfg = dict(model="tiny", n_ctx=4, eval_samples=1)
    with pytest.raises(E.UserError, match="'input_ids' or a 'text' column"):
        E.load_data(E.Config(dataset=str(tmp_path / "rows.jsonl"), **cfg), None, 512)
    with pytest.raises(E.UserError, match="no such file"):
        E.load_data(E.Config(dataset=str(tmp_path / "missing.txt"), **cfg), None, 512)
    source = write_sources(tmp_path, [[1, 2, 3, 4]] * 3)[0]
    with pytest.raises(E.UserError, match="fewer than --eval-samples"):
        E.load_data(E.Config(dataset=source, **{**cfg, "eval_samples": 5}), None, 512)
    _, train = E.load_data(E.Config(dataset=source, **{**cfg, "eval_samples": 3}), None, 512)
    with pytest.raises(E.UserError, match="no sequences left for training"):
        next(train)
    with pytest.raises(E.UserError, match="token id 4, beyond the model's vocabulary of 4"):
        E.load_data(E.Config(dataset=source, **cfg), None, 4)
    _, train = E.load_data(E.Config(dataset=write_sources(tmp_path / "v", [[1] * 4, [9] * 4])[0], **cfg), None, 5)
    with pytest.raises(E.UserError, match="token id 9"):
        next(train)  # training rows are checked too, not only the evaluation set


# -----------------------------------------------------------------------------
# Config, CLI, schedule


def test_the_paper_run_needs_no_other_flag():
    cfg = E.parse_config(["--loss", "e2e", "--layer", "6"])
    assert (cfg.model, cfg.dataset, cfg.n_ctx, cfg.n_samples) == ("gpt2", E.PAPER_DATASET, 1024, 400_000)
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_samples) == (8, 2, 5e-4, 20_000)
    assert (cfg.lr_min_ratio, cfg.grad_clip, cfg.dict_ratio, cfg.eval_samples) == (0.1, 10.0, 60.0, 500)
    assert (cfg.sparsity_coeff, cfg.kl_coeff, cfg.out_dir) == (3.0, 1.0, "out/e2e_layer6")
    local, ds = E.parse_config(["--loss", "local"]), E.parse_config(["--loss", "e2e_ds"])
    assert (local.sparsity_coeff, ds.sparsity_coeff, ds.kl_coeff, ds.downstream_coeff) == (4.0, 50.0, 0.5, 2.5)
    assert E.parse_config(["--loss", "e2e_ds", "--sparsity-coeff", "7", "--kl-coeff", "1"]).sparsity_coeff == 7.0


def test_cli_flag_names():
    flags = set(E.build_parser()._option_string_actions)
    for flag in ("--model --dataset --loss --layer --n-samples --batch-size --grad-accum --n-ctx --dict-ratio "
                 "--sparsity-coeff --lr --warmup-samples --eval-samples --eval-every --out-dir --seed --device "
                 "--eval-only --sae --compile --kl-coeff --downstream-coeff").split():
        assert flag in flags, flag


@pytest.mark.parametrize("argv, message", [
    (["--loss", "mse"], "--loss must be one of"),
    (["--lr", "abc"], "invalid float value"),
    (["--sparsity-coeff", "-1"], "--sparsity-coeff must be a finite number"),
    (["--downstream-coeff", "nan"], "--downstream-coeff must be a finite number"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--dict-ratio", "-2"], "--dict-ratio must be > 0"),
    (["--n-samples", "3"], "less than one optimiser step"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--eval-only"], "--eval-only and --inspect need --sae"),
    (["--eval-samples", "0"], "--eval-samples must be > 0"),
    (["--n-ctx", "1"], "--n-ctx must be at least 2"),
])
def test_bad_flags_are_one_sentence(argv, message):
    with pytest.raises(E.UserError, match=message):
        E.parse_config(argv)


def test_model_dependent_checks(tmp_path):
    for kw, message in [(dict(layer=12), "outside the model's blocks 0 … 11"),
                        (dict(loss="e2e_ds", layer=11), "needs a block after --layer"),
                        (dict(n_ctx=2048), "longer than the model's context")]:
        with pytest.raises(E.UserError, match=message):
            E.setup(E.Config(model="tiny", dataset="random", device="cpu", **kw))
    with pytest.raises(E.UserError, match="no such folder"):
        E.load_model(str(tmp_path / "nothing_here"), torch.device("cpu"))
    with pytest.raises(E.UserError, match="--device cuda:99 is not usable here"):
        E.setup(E.Config(model="tiny", dataset="random", device="cuda:99"))
    with pytest.raises(E.UserError, match="--device must name a device such as cpu, cuda or cuda:1, not 'gpu'"):
        E.Config(model="tiny", dataset="random", device="gpu")


def test_soft_capped_logits_are_refused(monkeypatch):
    def capped():
        model = E.tiny_gpt2()
        model.config.final_logit_softcapping = 30.0  # as Gemma 2 has
        return model
    monkeypatch.setitem(E.RANDOM_MODELS, "tiny", capped)
    with pytest.raises(E.UserError, match="soft-caps its logits"):
        E.setup(E.Config(model="tiny", dataset="random", device="cpu"))


def test_decoder_blocks_of_other_architectures():
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100))
    assert E.decoder_blocks(neox) is neox.gpt_neox.layers and len(neox.gpt_neox.layers) == 3
    with pytest.raises(E.UserError, match="cannot find the decoder blocks"):
        E.decoder_blocks(torch.nn.Linear(2, 2))


def test_lr_schedule():
    f = lambda s: E.lr_factor(s, warmup_steps=10, total_steps=111, min_ratio=0.1)  # steps 0 … 110
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    short = [E.lr_factor(s, warmup_steps=8, total_steps=4, min_ratio=0.1) for s in range(4)]  # warm-up > run
    assert short[-1] == pytest.approx(0.1) and max(short) == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# 7. The CLI end to end, 8. a Llama-style model


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "e2e_sae.py", *args], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def check_output_folder(out: Path, loss: str, n_layers: int, layer: int):
    assert OUTPUT_FILES <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert set(metrics["downstream_mse"]) == {str(k) for k in range(layer + 1, n_layers)}
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == loss and config["layer"] == layer and config["dict_size"] == config["d_model"] * 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("train/loss" in r and r["tokens_per_s"] > 0 for r in log)
    assert any("eval/kl" in r for r in log)
    assert set(load_file(str(out / "sae.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    return metrics


def test_cli_tiny_model_random_data(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--model", "tiny", "--loss", "e2e_ds", "--layer", "9", "--n-samples", "64", "--batch-size", "4",
                "--n-ctx", "32", "--eval-samples", "8", "--eval-every", "32", "--dict-ratio", "2",
                "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    metrics = check_output_folder(out, "e2e_ds", 12, 9)
    assert metrics["n_eval_tokens"] == 8 * 32
    assert "final:" in r.stdout


def test_cli_local_model_folder_and_text_dataset_then_eval_only(tmp_path, capsys):
    """main() with the flags a user would type (in this process: test_cli_tiny_model_random_data is the
    one that starts `python e2e_sae.py`)."""
    docs = [" ".join(f"w{(i * j) % 37}" for j in range(60)) for i in range(30)]
    model_dir = tmp_path / "model"
    tok = make_tokenizer(model_dir, docs)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                               eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    out = tmp_path / "run"
    E.main(["--model", str(model_dir), "--dataset", str(tmp_path / "corpus.txt"), "--loss", "local",
            "--layer", "1", "--n-samples", "32", "--batch-size", "4", "--n-ctx", "16", "--eval-samples", "6",
            "--dict-ratio", "2", "--out-dir", str(out)])
    trained = check_output_folder(out, "local", 3, 1)
    assert trained["n_eval_tokens"] == 6 * 16 and "final:" in capsys.readouterr().out

    E.main(["--eval-only", "--sae", str(out), "--out-dir", str(tmp_path / "eval")])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(evaluated) == METRIC_KEYS and f"wrote {tmp_path / 'eval'}/metrics.json" in capsys.readouterr().out
    for k in METRIC_KEYS - {"downstream_mse"}:
        assert evaluated[k] == pytest.approx(trained[k], rel=1e-4, abs=1e-6), k


def test_bad_saved_config_and_out_dir_are_clear_errors(tmp_path):
    E.save_sae(identity_sae(64), tmp_path / "sae.safetensors")
    for text in ("{broken", "[1, 2]"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(E.UserError, match="config.json is not a readable run configuration"):
            E.parse_config(["--eval-only", "--sae", str(tmp_path)])
        with pytest.raises(E.UserError, match="config.json is not a readable run configuration"):
            E.load_sae(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(E.UserError, match="cannot create --out-dir"):
        E.train(E.Config(model="tiny", dataset="random", out_dir=str(tmp_path / "afile" / "run")))
    with pytest.raises(E.UserError, match="leaves no dictionary element"):
        E.train(E.Config(model="tiny", dataset="random", dict_ratio=0.001, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # a failed run leaves no folder behind


def test_a_dataset_without_training_rows_leaves_an_earlier_run_intact(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    source = write_sources(tmp_path, [list(range(16))] * 4)[0]
    with pytest.raises(E.UserError, match="no sequences left for training"):
        E.train(E.Config(model="tiny", dataset=source, n_ctx=16, eval_samples=4, out_dir=str(out), overwrite=True))
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


def test_eval_only_with_a_bare_sae_file(tmp_path, capsys):
    E.save_sae(identity_sae(64), tmp_path / "sae.safetensors")
    cfg = E.parse_config(["--eval-only", "--sae", str(tmp_path), "--model", "tiny", "--layer", "3",
                          "--n-ctx", "16", "--eval-samples", "4", "--device", "cpu"])
    assert cfg.out_dir == str(tmp_path)
    m = E.evaluate_saved(cfg)
    assert abs(m["kl"]) < 1e-6 and json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(m))
    with pytest.raises(E.UserError, match="pass --model and --layer"):
        E.parse_config(["--eval-only", "--sae", str(tmp_path), "--model", "tiny"])
    with pytest.raises(E.UserError, match="pass --model and --layer"):
        E.parse_config(["--eval-only", "--sae", str(tmp_path), "--layer", "3"])


def test_offline_main_run_fails_fast_with_one_sentence(tmp_path):
    r = run_cli("--loss", "e2e", "--layer", "6", "--out-dir", str(tmp_path / "run"),
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--model tiny --dataset random" in r.stderr and "Traceback" not in r.stderr


def test_llama_style_model_trains_and_evaluates(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model = E.load_model(str(tmp_path / "llama"), torch.device("cpu"))[0]
    blocks = E.decoder_blocks(model)
    tokens = tokens_for(model)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
        with E.splice_sae(blocks[2], identity_sae(32)) as seen:
            spliced = model(tokens).logits
    assert torch.equal(seen.a, hidden[2])
    assert torch.allclose(spliced, model(tokens).logits, atol=1e-5)
    for loss in ("local", "e2e_ds"):
        cfg = E.Config(model=str(tmp_path / "llama"), dataset="random", loss=loss, layer=2, n_samples=16,
                       batch_size=2, grad_accum=2, n_ctx=16, eval_samples=4, dict_ratio=2, device="cpu",
                       out_dir=str(tmp_path / loss))
        metrics = E.train(cfg)
        check_output_folder(tmp_path / loss, loss, 4, 2)
        assert set(metrics) == METRIC_KEYS and set(metrics["downstream_mse"]) == {3}


# -----------------------------------------------------------------------------
# Checkpoints, exact resume, bad input, bad numbers


def run_args(out: Path, data: str, *extra):
    """A tiny run that crosses its warm-up, two evaluations and three checkpoints in 48 steps."""
    return ["--model", "tiny", "--dataset", data, "--n-ctx", "16", "--batch-size", "4", "--grad-accum", "2",
            "--n-samples", "384", "--warmup-samples", "64", "--eval-samples", "8", "--eval-every", "128",
            "--save-every", "96", "--log-every", "4", "--dict-ratio", "4", "--device", "cpu",
            "--out-dir", str(out), *extra]


def train_lines(out: Path):
    """The log without its timings: what must be the same whether or not the run was interrupted."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in E.read_log(out / "log.jsonl")]


def assert_same_run(a: Path, b: Path):
    sae_a, sae_b = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert all(torch.equal(sae_a[k], sae_b[k]) for k in sae_a)  # bitwise (CPU kernels are deterministic)
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    assert train_lines(a) == train_lines(b)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """run_args's run on random tokens, left alone: what each interrupted and resumed run must end as."""
    out = tmp_path_factory.mktemp("alone") / "run"
    E.train(E.parse_config(run_args(out, "random")))
    return out


def test_sigterm_checkpoints_and_resume_ends_bitwise_equal(tmp_path, alone):
    """A real signal from outside: SIGTERM to a subprocess once its first checkpoint exists (step 12 of
    48), then --resume, compared with the same run left alone. The data are streamed (random tokens
    through the shuffle buffer)."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "e2e_sae.py", *run_args(out, "random")], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "checkpoint.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    last_line = stderr.strip().splitlines()[-1]  # after the progress bar, which tqdm draws on stderr
    assert last_line.startswith("stopped: SIGTERM after step") and "Traceback" not in stderr
    assert last_line.endswith(f"checkpoint written to {out}; continue with: python e2e_sae.py --resume {out}")
    step = json.loads((out / "checkpoint.json").read_text())["step"]
    assert 12 <= step < 48 and not (out / "sae.safetensors").exists()
    E.train(E.parse_config(["--resume", str(out)]))
    assert_same_run(alone, out)


def signal_on_call(monkeypatch, name: str, n: int, signum=signal.SIGINT):
    """Deliver `signum` to this process during the n-th call (counted from 1) of E.<name>."""
    calls = {"n": 0}
    real = getattr(E, name)

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(E, name, wrapper)


def interrupt_at(monkeypatch, step: int, signum=signal.SIGINT):
    """Deliver `signum` to this process during optimiser step `step` (counted from 1)."""
    signal_on_call(monkeypatch, "train_step", step, signum)


@pytest.mark.parametrize("data", ["random", "jsonl"])
def test_interrupted_and_resumed_run_equals_the_run_left_alone(tmp_path, monkeypatch, alone, data):
    if data == "jsonl":  # a local dataset: held in memory, reshuffled every epoch (384 samples = 2.4 epochs)
        data = write_sources(tmp_path, torch.randint(512, (168, 16), generator=torch.Generator().manual_seed(3)).tolist())[1]
        alone = tmp_path / "alone"
        E.train(E.parse_config(run_args(alone, data)))
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        interrupt_at(m, 29)  # between the checkpoints of steps 24 and 36, after the warm-up and an evaluation
        with pytest.raises(E.Interrupted, match="SIGINT after step 29 of 48"):
            E.train(E.parse_config(run_args(out, data)))
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 29
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    E.train(E.parse_config(["--resume", str(out), "--eval-every", "128"]))  # a harmless flag may change
    assert_same_run(alone, out)
    assert not (out / "checkpoint.safetensors").exists()  # a finished run keeps only its SAE


def test_resume_from_a_periodic_checkpoint_after_a_hard_kill(tmp_path, monkeypatch, alone):
    """No signal handler runs on SIGKILL: the run restarts from its last periodic checkpoint (step 36)
    and rewrites the log lines written after it."""
    out = tmp_path / "killed"

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    real = E.train_step
    calls = {"n": 0}

    def train_step(*args, **kwargs):
        calls["n"] += 1
        return killed() if calls["n"] == 43 else real(*args, **kwargs)

    monkeypatch.setattr(E, "train_step", train_step)
    with pytest.raises(RuntimeError, match="killed"):
        E.train(E.parse_config(run_args(out, "random")))
    monkeypatch.setattr(E, "train_step", real)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 36
    assert max(r["step"] for r in E.read_log(out / "log.jsonl")) == 40  # lines past the checkpoint ...
    E.train(E.parse_config(["--resume", str(out)]))
    assert_same_run(alone, out)  # ... are replaced, not repeated


def test_resume_refuses_a_contradicting_config(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(E.Interrupted):
            E.train(E.parse_config(run_args(out, "random")))
    for flags, message in [(["--layer", "5"], "--layer 5 contradicts the checkpoint .* \\(--layer 6\\)"),
                           (["--model", "gpt2"], "--model gpt2 contradicts the checkpoint .* \\(--model tiny\\)"),
                           (["--dict-ratio", "8"], "--dict-ratio 8.0 contradicts the checkpoint .* \\(--dict-ratio 4.0\\)"),
                           (["--loss", "local"], "--loss local contradicts"),
                           (["--out-dir", str(tmp_path / "elsewhere")], "--out-dir cannot be combined with --resume")]:
        with pytest.raises(E.UserError, match=message):
            E.parse_config(["--resume", str(out), *flags])
    cfg = E.parse_config(["--resume", str(out), "--eval-every", "64", "--log-every", "1", "--device", "cpu"])
    assert (cfg.eval_every, cfg.log_every, cfg.layer, cfg.out_dir) == (64, 1, 6, str(out))
    # A checkpoint whose SAE does not fit the model (here: a width of 32 instead of 64) is refused too.
    t = load_file(str(out / "checkpoint.safetensors"))
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        metadata = f.metadata()
    t["sae.encoder.weight"] = torch.zeros(256, 32)
    save_file(t, str(out / "checkpoint.safetensors"), metadata=metadata)
    with pytest.raises(E.UserError, match="not a valid checkpoint for this run"):
        E.train(E.parse_config(["--resume", str(out)]))


def test_a_killed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    """SIGKILL a process that writes checkpoints in a loop, at whatever moment; the files it leaves
    always load, as the checkpoint of some step it completed. The process is a fork of this one: the
    SAE and Adam's state are made before the fork, and the child only writes files."""
    sae = E.SAE(64, 8192)
    opt = torch.optim.Adam(sae.parameters())
    sae(torch.randn(2, 64))[0].sum().backward()
    opt.step()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, which never returns into pytest
        try:
            os.close(read_end)
            for step in itertools.count(1):
                with torch.no_grad():
                    sae.encoder.bias.fill_(step)
                E.save_checkpoint(tmp_path, sae, opt, {"step": step})
                os.write(write_end, f"{step}\n".encode())
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as progress:
        done = [int(progress.readline()) for _ in range(3)]  # three complete checkpoints ...
        time.sleep(0.37)  # ... then a kill in the middle of whatever comes next
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    state = E.checkpoint_state(tmp_path)
    sae = E.SAE(64, 8192)
    E.load_checkpoint(tmp_path, sae, torch.optim.Adam(sae.parameters()))
    assert state["step"] >= done[-1] and torch.all(sae.encoder.bias == state["step"])
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] in (state["step"], state["step"] - 1)


def test_a_failed_checkpoint_write_changes_nothing(tmp_path, monkeypatch):
    sae = E.SAE(8, 16)
    opt = torch.optim.Adam(sae.parameters())
    E.save_checkpoint(tmp_path, sae, opt, {"step": 1})
    before = (tmp_path / "checkpoint.safetensors").read_bytes()

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt  # the moment a kill would strike

    monkeypatch.setattr(E, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        E.save_checkpoint(tmp_path, sae, opt, {"step": 2})
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert E.checkpoint_state(tmp_path)["step"] == 1


def test_a_planted_nan_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = E.compute_loss
    calls = {"n": 0}

    def compute_loss(*args, **kwargs):
        loss, terms, c = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 * 30 - 1:  # the first micro-batch of step 30
            terms["kl"] = terms["kl"] * float("nan")
            loss = loss + terms["kl"]
        return loss, terms, c

    monkeypatch.setattr(E, "compute_loss", compute_loss)
    with pytest.raises(E.UserError) as e:
        E.train(E.parse_config(run_args(out, "random")))
    message = str(e.value)
    assert message.startswith("step 30: the loss or its gradient is not finite (loss nan, kl nan, sparsity ")
    assert f"The checkpoint of step 24 in {out} is intact" in message
    sae = E.SAE(64, 256)
    state = E.load_checkpoint(out, sae, torch.optim.Adam(sae.parameters()))
    assert state["step"] == 24 and all(torch.isfinite(p).all() for p in sae.parameters())
    assert "resuming repeats the same steps: start again with a lower --lr" in message
    assert not (out / "sae.safetensors").exists()


def test_an_output_folder_with_a_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(out, "random", "--n-samples", "32")
    E.train(E.parse_config(args))
    first = (out / "sae.safetensors").read_bytes()
    with pytest.raises(E.UserError, match="already holds a finished run .*: pass --overwrite to replace it"):
        E.train(E.parse_config(args))
    assert (out / "sae.safetensors").read_bytes() == first
    E.train(E.parse_config(["--resume", str(out)]))  # nothing to resume
    assert "holds a finished run: nothing to resume" in capsys.readouterr().out
    E.main(["--compare", str(out), str(out), "--device", "cpu"])  # analysis of the SAE about to be replaced
    E.train(E.parse_config([*args, "--overwrite", "--seed", "1"]))
    assert (out / "sae.safetensors").read_bytes() != first and not (out / "compare.json").exists()
    # SAELens's weights are the new SAE's (a fresh hard link), and every file is readable as open() makes it
    assert (out / "sae_weights.safetensors").read_bytes() == (out / "sae.safetensors").read_bytes()
    umask = os.umask(0o22)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(OUTPUT_FILES, 0o666 & ~umask)


def bad_checkpoint(tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    sae = E.SAE(64, 256)
    E.save_checkpoint(out, sae, torch.optim.Adam(sae.parameters()), {"step": 1, "config": {}})
    path = out / "checkpoint.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if kind == "truncated" else b"\x00" * 64 + data[64:])
    return str(out)


def sae_dir(folder: Path, d_model: int, dict_size: int) -> str:
    folder.mkdir(exist_ok=True)
    E.save_sae(E.SAE(d_model, dict_size), folder / "sae.safetensors")
    return str(folder)


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["--layer", "12"], "--layer 12 is outside the model's blocks 0 … 11"),
    (lambda p: ["--loss", "l2"], "--loss must be one of local, e2e, e2e_ds, not 'l2'"),
    (lambda p: ["--sparsity-coeff", "-1"], "--sparsity-coeff must be a finite number ≥ 0, not -1.0"),
    (lambda p: ["--downstream-coeff", "nan"], "--downstream-coeff must be a finite number ≥ 0, not nan"),
    (lambda p: ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (lambda p: ["--lr", "-0.1"], "--lr must be a finite number ≥ 0, not -0.1"),
    (lambda p: ["--dict-ratio", "0"], "--dict-ratio must be > 0, not 0.0"),
    (lambda p: ["--batch-size", "-4"], "--batch-size must be > 0, not -4"),
    (lambda p: ["--n-ctx", "4096"], "--n-ctx 4096 is longer than the model's context of 1024 tokens"),
    (lambda p: ["--dataset", str(p / "nope.jsonl")], "nope.jsonl: no such file or folder"),
    (lambda p: ["--dataset", write_sources(p, [[1, 2, 3]] * 4)[1], "--n-ctx", "16"],
     "holds only 0 sequences of 16 tokens, fewer than --eval-samples 32"),
    (lambda p: (p / "rows.jsonl").write_text('{"tokens": [1, 2]}\n') and ["--dataset", str(p / "rows.jsonl")],
     "dataset rows need an 'input_ids' or a 'text' column; these have \\['tokens'\\]"),
    (lambda p: ["--eval-only", "--sae", str(p), "--layer", "3"], "holds no sae.safetensors"),
    (lambda p: (p / "sae.safetensors").write_bytes(b"garbage") and ["--eval-only", "--sae", str(p), "--layer", "3"],
     "sae.safetensors is not a valid SAE file"),
    (lambda p: ["--resume", str(p)], "holds no checkpoint.safetensors to resume from"),
    (lambda p: ["--resume", bad_checkpoint(p, "truncated")], "checkpoint.safetensors is not a valid checkpoint"),
    (lambda p: ["--resume", bad_checkpoint(p, "corrupt")], "checkpoint.safetensors is not a valid checkpoint"),
    (lambda p: (p / "metrics.json").write_text("{}") and ["--out-dir", str(p)], "already holds a finished run"),
    (lambda p: ["--resume", str(p), "--overwrite"], "--overwrite cannot be combined with --resume"),
    (lambda p: ["--inspect"], "--eval-only and --inspect need --sae DIR"),
    (lambda p: ["--inspect", "--sae", sae_dir(p, 64, 8), "--layer", "3", "--features", "2,x"],
     "--features takes comma-separated numbers, not '2,x'"),
    (lambda p: ["--inspect", "--sae", sae_dir(p, 64, 8), "--layer", "3", "--features", "8"],
     "--features 8: the dictionary has elements 0 … 7"),
    (lambda p: ["--inspect", "--sae", sae_dir(p, 32, 8), "--layer", "3"], "reads width 32, but tiny has 64"),
    (lambda p: ["--compare", sae_dir(p, 64, 8), str(p / "nowhere")], "nowhere holds no sae.safetensors"),
    (lambda p: ["--compare", sae_dir(p / "a", 64, 8), sae_dir(p / "b", 32, 8)],
     "the SAEs read different widths \\(64 and 32\\): they cannot be compared"),
    (lambda p: ["--compare", sae_dir(p / "a", 64, 8), sae_dir(p / "b", 64, 8), "--device", "cuda:99"],
     "--device cuda:99 is not usable here"),
    (lambda p: ["--device", "cdua"], "--device must name a device such as cpu, cuda or cuda:1, not 'cdua'"),
    (lambda p: ["--inspect", "--sae", sae_dir(p, 64, 8), "--layer", "3", "--inspect-samples", "0"],
     "--inspect-samples must be > 0, not 0"),
    (lambda p: ["--inspect", "--sae", sae_dir(p, 64, 8), "--layer", "3", "--features", ""],
     "--features takes comma-separated numbers, not ''"),
])
def test_bad_input_is_one_sentence_and_a_nonzero_exit(tmp_path, capsys, make_args, message):
    args = make_args(tmp_path)
    argv = args if "--resume" in args else ["--model", "tiny", "--device", "cpu", "--out-dir", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1, captured.err
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err


def test_an_offline_dataset_and_an_interrupted_start_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(E, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "tiny", "--dataset", "someone/some-corpus", "--device", "cpu", "--out-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot stream dataset 'someone/some-corpus': the Hugging Face hub is unreachable" in err
    assert "--model tiny --dataset random" in err

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "setup", ctrl_c)  # Ctrl-C before the training loop (loading the model, say)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "tiny", "--device", "cpu", "--out-dir", str(tmp_path / "b")])
    assert e.value.code == 130 and capsys.readouterr().err.strip().splitlines() == [
        "stopped: interrupted (any checkpoint already written is intact)"]


def signal_during_evaluation(monkeypatch, n: int, signum=signal.SIGINT):
    """Deliver `signum` to this process during the n-th evaluation (counted from 1)."""
    signal_on_call(monkeypatch, "evaluate", n, signum)


def test_signals_during_evaluations_lose_nothing(tmp_path, monkeypatch, alone):
    """SIGTERM during a periodic evaluation (the checkpoint follows it) and Ctrl-C during the final one
    (the checkpoint of the last step precedes it): each resumed run still ends as the one left alone."""
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        signal_during_evaluation(m, 1, signal.SIGTERM)  # the evaluation after step 16
        with pytest.raises(E.Interrupted, match="SIGTERM after step 16 of 48"):
            E.train(E.parse_config(run_args(out, "random")))
    with monkeypatch.context() as m:
        signal_during_evaluation(m, 2)  # the run resumes at 16; its evaluations are at 32 and the final one at 48
        with pytest.raises(KeyboardInterrupt):  # a signal outside the loop acts as usual
            E.train(E.parse_config(["--resume", str(out)]))
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 48
    E.train(E.parse_config(["--resume", str(out)]))
    assert_same_run(alone, out)


def test_a_run_stopped_before_a_periodic_evaluation_resumes_with_it(tmp_path, monkeypatch, alone):
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        interrupt_at(m, 16)  # step 16 ends at an evaluation point: the checkpoint comes first
        with pytest.raises(E.Interrupted, match="after step 16 of 48"):
            E.train(E.parse_config(run_args(out, "random")))
    assert not any("eval/kl" in r for r in E.read_log(out / "log.jsonl"))
    E.train(E.parse_config(["--resume", str(out)]))
    assert_same_run(alone, out)


def test_resume_keeps_the_device_and_dtype_of_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(E.Interrupted):
            E.train(E.parse_config(run_args(out, "random", "--dtype", "bf16")))
    cfg = E.parse_config(["--resume", str(out)])
    assert (cfg.device, cfg.dtype, cfg.out_dir) == ("cpu", "bf16", str(out))
    assert E.parse_config(["--resume", str(out), "--dtype", "fp32"]).dtype == "fp32"
    assert E.Config(resume=str(out), model="tiny").out_dir == str(out)  # in Python too


def test_bad_datasets_give_one_line_without_library_noise(tmp_path, monkeypatch, capfd):
    """capfd sees what the libraries print too (progress bars, C-level writes), and their log handlers,
    made when they were imported, are pointed at the stderr of this test."""
    for handler in logging.getLogger("datasets").handlers:
        monkeypatch.setattr(handler, "stream", sys.stderr)
    (tmp_path / "broken.jsonl").write_text('{"input_ids": [1, 2\n')
    (tmp_path / "empty.jsonl").write_text("")
    for name, message in [("broken.jsonl", "cannot read dataset .*broken.jsonl.*: JSON parse error"),
                          ("empty.jsonl", "--dataset .*empty.jsonl is an empty file")]:
        with pytest.raises(SystemExit) as e:
            E.main(["--model", "tiny", "--dataset", str(tmp_path / name), "--out-dir", str(tmp_path / "out")])
        err = capfd.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.match("error: " + message, err), err


# ----------------------------------------------------------------------------------------------------
# Many processes: real torchrun launches, gloo on the CPU, on loopback only


def torchrun(n: int, *args):
    """`torchrun --standalone --nproc_per_node n e2e_sae.py *args` as a subprocess (started, not waited for).
    torchrun gives each process one thread when n > 1; with n = 1, the process has as many as this one."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                             "e2e_sae.py", *args], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def workers(torchrun_proc) -> dict:
    """{rank: pid} of torchrun's worker processes (Linux: read from /proc)."""
    pids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        rank = [int(e[5:]) for e in environ if e.startswith(b"RANK=")]
        if ppid == torchrun_proc.pid and rank:
            pids[rank[0]] = int(stat.parent.name)
    return pids


def communicate(proc, timeout=90) -> tuple[str, str]:
    """proc.communicate(), and on a timeout (processes stuck in a collective) kill them all."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in workers(proc).values():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        raise


def finished(proc) -> str:
    stdout, stderr = communicate(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


# 9 evaluation sequences: two processes evaluate shares of 5 and 4, in micro-batches of 2, so a mean
# of per-process or per-batch means would differ from the pooled metrics.
DDP_RUN = ("--eval-samples", "9", "--batch-size", "4")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The reference: one plain process, micro-batch 4."""
    out = tmp_path_factory.mktemp("plain") / "run"
    E.train(E.parse_config(run_args(out, "random", *DDP_RUN)))
    return out


def assert_close_runs(a: Path, b: Path, atol=1e-5, rtol=1e-5):
    sae_a, sae_b = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    for k in sae_a:
        torch.testing.assert_close(sae_a[k], sae_b[k], atol=atol, rtol=0)
    log_a, log_b = train_lines(a), train_lines(b)
    assert [r.keys() for r in log_a] == [r.keys() for r in log_b]
    for r_a, r_b in zip(log_a, log_b):
        for k, v in r_a.items():
            if isinstance(v, float):
                assert v == pytest.approx(r_b[k], rel=rtol, abs=atol), (r_a["step"], k)


def test_two_processes_train_the_sae_of_one_and_pool_its_evaluation(tmp_path, plain_run, tiny):
    """2 processes with micro-batch 2 each against 1 process with micro-batch 4, on the same data:
    the same SAE after 48 Adam steps up to float rounding (measured: 4e-7 at most, on weights of
    size 0.05-0.5), the same training log; and the 2-process evaluation of the final SAE equals a
    1-process evaluation of the saved SAE."""
    out = tmp_path / "two"
    stdout = finished(torchrun(2, *run_args(out, "random", *DDP_RUN)))
    assert stdout.count("e2e SAE at layer 6") == 1 and "2 processes of 2 sequences per micro-batch" in stdout
    assert stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert json.loads((out / "config.json").read_text())["n_processes"] == 2
    assert_close_runs(plain_run, out, atol=1e-5)
    # The evaluation: pooled sums over both processes' shares, against one process on all 9 sequences.
    model, blocks = tiny
    sae, _ = E.load_sae(out)
    cfg = E.parse_config(run_args(out, "random", *DDP_RUN))
    eval_tokens, _ = E.load_data(cfg, None, model.config.vocab_size)
    one = E.evaluate(model, blocks, sae, eval_tokens, cfg.layer, batch_size=9)
    two = json.loads((out / "metrics.json").read_text())
    assert two["n_eval_tokens"] == one["n_eval_tokens"] == 9 * 16
    assert two["alive_dict_elements"] == one["alive_dict_elements"] and two["l0"] == pytest.approx(one["l0"], abs=1e-12)
    # Per-batch sums run in fp32 (cross-entropy, KL) before they are pooled in float64: values of size
    # 1-10 agree to a few 1e-7. A mean of the two processes' means would be off by about 1e-3.
    for k in METRIC_KEYS - {"downstream_mse", "n_eval_tokens", "alive_dict_elements", "l0"}:
        assert two[k] == pytest.approx(one[k], rel=1e-6, abs=2e-6), k
    assert two["downstream_mse"] == pytest.approx({str(k): v for k, v in one["downstream_mse"].items()}, rel=1e-6)


def test_one_process_under_torchrun_is_a_plain_run(tmp_path, plain_run):
    out = tmp_path / "one"
    stdout = finished(torchrun(1, *run_args(out, "random", *DDP_RUN)))
    assert "processes of" in stdout and json.loads((out / "config.json").read_text())["n_processes"] == 1
    assert_same_run(plain_run, out)  # bitwise: DDP over one process changes no number


def test_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path, plain_run):
    """SIGTERM to rank 1 alone (torchrun would pass a signal it gets on to every process): the processes
    agree on the step to stop after, rank 0 writes one checkpoint, and both exit. The checkpoint of two
    processes resumes in one, and the run ends as one process's run left alone (up to float rounding).
    (The signal is sent once the checkpoint of step 12 exists; in every trial, also with both cores
    busy, the processes stopped at step 13 of 48.)"""
    out = tmp_path / "stopped"
    proc = torchrun(2, *run_args(out, "random", *DDP_RUN))
    while not (out / "checkpoint.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    os.kill(workers(proc)[1], signal.SIGTERM)
    stdout, stderr = communicate(proc)
    assert proc.returncode != 0
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: SIGTERM after step")]
    assert len(stopped) == 1, stderr[-3000:]  # said once, by rank 0, which did not get the signal itself
    step = json.loads((out / "checkpoint.json").read_text())["step"]
    assert f"after step {step} of 48" in stopped[0] and 12 <= step < 48
    assert not (out / "sae.safetensors").exists()
    E.train(E.parse_config(["--resume", str(out)]))
    assert_close_runs(plain_run, out, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_sharded_evaluation_equals_one_process_for_any_number_of_processes(tiny, monkeypatch, n):
    """n processes simulated in this one: each evaluates its share of 5 sequences (with n = 7, some
    shares are empty), all_reduce adds up their sums, and the metrics equal one process's evaluation."""
    model, blocks = tiny
    torch.manual_seed(0)
    sae, tokens = E.SAE(64, 128), tokens_for(model, B=5, T=12)
    one = E.evaluate(model, blocks, sae, tokens, layer=4, batch_size=2)
    shares = []
    monkeypatch.setattr(E, "world_size", lambda: n)
    monkeypatch.setattr(E, "all_reduce", lambda sums: shares.append(sums) or sums)
    for r in range(n):  # first pass: every process's own sums
        monkeypatch.setattr(E, "rank", lambda: r)
        E.evaluate(model, blocks, sae, tokens, layer=4, batch_size=2)
    total = {k: sum(share[k] for share in shares) for k in shares[0]}
    assert [int(share["tokens"]) for share in shares] == [len(t) * 12 for t in tokens.tensor_split(n)]
    monkeypatch.setattr(E, "all_reduce", lambda sums: total)  # second pass: what the collective returns
    pooled = E.evaluate(model, blocks, sae, tokens, layer=4, batch_size=2)
    assert pooled["n_eval_tokens"] == one["n_eval_tokens"] == 5 * 12
    for k in METRIC_KEYS - {"downstream_mse"}:
        assert pooled[k] == pytest.approx(one[k], rel=1e-6, abs=1e-7), k
    assert pooled["downstream_mse"] == pytest.approx(one["downstream_mse"], rel=1e-6)


def test_under_torchrun_flag_errors_are_said_once_and_others_by_each_process(monkeypatch, capsys):
    """As rank 1 of 2 (the process group itself left out): a mistake in the flags is rank 0's to say; an
    error met later is said by this process too, with its rank."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(E, "join_processes", lambda cfg: None)
    for argv, said in [(["--loss", "l2"], ""),
                       (["--layer", "12"], "error (rank 1): --layer 12 is outside the model's blocks 0 … 11\n")]:
        with pytest.raises(SystemExit) as e:
            E.main(["--model", "tiny", "--device", "cpu", *argv])
        assert e.value.code == 2 and capsys.readouterr().err == said


def test_the_batch_must_split_evenly_over_the_processes(monkeypatch):
    monkeypatch.setattr(E, "world_size", lambda: 3)
    assert E.local_batch_size(cfg_for("e2e", 6, batch_size=6)) == 2
    with pytest.raises(E.UserError, match="--batch-size 8 does not split evenly over 3 processes"):
        E.local_batch_size(cfg_for("e2e", 6, batch_size=8))


# ----------------------------------------------------------------------------------------------------
# Looking inside: --inspect, --compare, SAELens's files


def planted_model_and_sae(tmp_path, token: int):
    """The tiny GPT-2, saved to disk, with token `token`'s embedding moved to 10 along axis 0 (every other
    token and position stays within ±1.5 there), and an SAE at layer 0 whose element 0 is
    c_0 = relu(a_0 − 5): it fires on that token and on no other. Elements 1-7 never fire."""
    model = E.tiny_gpt2()
    with torch.no_grad():
        model.transformer.wte.weight[token] = 0.0
        model.transformer.wte.weight[token, 0] = 10.0
    assert (model.transformer.wte.weight[:, 0].abs().topk(2).values[1] + model.transformer.wpe.weight[:, 0].abs().max()) < 1.5
    model.save_pretrained(tmp_path / "model")
    sae = E.SAE(64, 8)
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.bias.fill_(-1.0)
        sae.encoder.weight[0, 0], sae.encoder.bias[0] = 1.0, -5.0
    (tmp_path / "sae").mkdir()
    E.save_sae(sae, tmp_path / "sae" / "sae.safetensors")
    return tmp_path / "model", tmp_path / "sae"


def test_inspect_finds_a_planted_feature(tmp_path, capsys):
    token = 123
    model_dir, sae_dir = planted_model_and_sae(tmp_path, token)
    E.main(["--inspect", "--sae", str(sae_dir), "--model", str(model_dir), "--layer", "0", "--dataset", "random",
            "--n-ctx", "32", "--inspect-samples", "64", "--batch-size", "5", "--features", "0,1", "--device", "cpu"])
    printed = capsys.readouterr().out
    result = json.loads((sae_dir / "inspect.json").read_text())
    tokens = E.load_data(E.Config(model="tiny", dataset="random", n_ctx=32, eval_samples=64, device="cpu"), None, 512)[0]
    n_hits, seqs_with_token = int((tokens == token).sum()), int((tokens == token).any(1).sum())
    assert n_hits >= 2 and result["n_tokens"] == 64 * 32
    planted, silent = result["features"]
    assert planted["frequency"] == n_hits / (64 * 32)  # exact
    assert len(planted["contexts"]) == min(E.TOP_CONTEXTS, seqs_with_token)
    for ctx in planted["contexts"]:
        assert ctx["tokens"][ctx["marked"]] == token and tokens[ctx["sequence"], ctx["position"]] == token
        assert ctx["activation"] == pytest.approx(5.0, abs=1.5) and f"«{token}»" in ctx["text"]
    assert f"«{token}»" in printed and silent["frequency"] == 0 and silent["contexts"] == []
    # the density histogram: one element fired (in the bin of its frequency), seven are dead
    d = result["density"]
    assert d["dead"] == 7 and sum(d["counts"]) == 1
    bin_of = next(i for i, (lo, hi) in enumerate(zip(d["log10_freq_edges"], d["log10_freq_edges"][1:]))
                  if lo <= math.log10(planted["frequency"]) < hi)
    assert d["counts"][bin_of] == 1 and "7 dead" in printed
    # More sequences asked for than a dataset holds: what there is, and a note.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": t.tolist()}) + "\n" for t in tokens[:5]))
    E.main(["--inspect", "--sae", str(sae_dir), "--model", str(model_dir), "--layer", "0", "--dataset", str(rows),
            "--n-ctx", "32", "--inspect-samples", "64", "--features", "0", "--device", "cpu"])
    assert json.loads((sae_dir / "inspect.json").read_text())["n_sequences"] == 5
    assert "over the first 5 sequences (160 tokens); the dataset has no more than 5" in capsys.readouterr().out


def test_the_running_top_k_equals_a_brute_force_top_k(tmp_path, tiny):
    """A random SAE at layer 3, 10 sequences in batches of 3: every element's top contexts (one per
    sequence, best first) against sorting all (sequence, element) maxima at once."""
    model, blocks = tiny
    torch.manual_seed(1)
    sae = E.SAE(64, 16)
    (tmp_path / "sae").mkdir()
    E.save_sae(sae, tmp_path / "sae" / "sae.safetensors")
    sae, _ = E.load_sae(tmp_path / "sae")
    E.main(["--inspect", "--sae", str(tmp_path / "sae"), "--model", "tiny", "--layer", "3", "--n-ctx", "24",
            "--inspect-samples", "10", "--batch-size", "3", "--top-features", "16", "--device", "cpu"])
    result = json.loads((tmp_path / "sae" / "inspect.json").read_text())
    tokens = E.load_data(E.Config(model="tiny", dataset="random", n_ctx=24, eval_samples=10, device="cpu"), None, 512)[0]
    with torch.no_grad(), E.record_resid(blocks, [3], stop_at=3) as resid:
        E.run_model(model, tokens)
        c = sae(resid[3])[1]  # (10, T, F): every activation at once
    best, where = c.max(1)  # (10, F)
    assert len(result["features"]) == 16
    for r in result["features"]:
        f = r["feature"]
        order = [s for s in best[:, f].argsort(descending=True).tolist() if best[s, f] > 0][:E.TOP_CONTEXTS]
        assert [ctx["sequence"] for ctx in r["contexts"]] == order
        assert [ctx["position"] for ctx in r["contexts"]] == [int(where[s, f]) for s in order]
        assert [ctx["activation"] for ctx in r["contexts"]] == pytest.approx([float(best[s, f]) for s in order], rel=1e-5)
        assert r["frequency"] == (c[..., f] > 0).sum().item() / c[..., 0].numel()
        assert r["mean_activation"] == pytest.approx(c[..., f][c[..., f] > 0].mean().item() if r["frequency"] else 0.0, rel=1e-5)


def sae_with_dictionary(folder: Path, dictionary: torch.Tensor) -> Path:
    """An SAE whose decoder columns are the given (D, F) dictionary (unit-norm columns)."""
    sae = E.SAE(*dictionary.shape)
    with torch.no_grad():
        sae.decoder.weight.copy_(dictionary)
    folder.mkdir()
    E.save_sae(sae, folder / "sae.safetensors")
    return folder


def test_compare_dictionaries(tmp_path, capsys):
    # By hand, in 2-D: A's elements at 0°, 90°, 180°, 270°; B is A turned by 30°. Each element of A is
    # 30° from its nearest of B (cos 30° = √3/2) and 90° from its nearest other of A (cos 90° = 0).
    angle = torch.tensor([0.0, 90.0, 180.0, 270.0]).deg2rad()
    A = sae_with_dictionary(tmp_path / "a", torch.stack([angle.cos(), angle.sin()]))
    B = sae_with_dictionary(tmp_path / "b", torch.stack([(angle + math.pi / 6).cos(), (angle + math.pi / 6).sin()]))
    E.main(["--compare", str(A), str(B), "--device", "cpu"])
    result = json.loads((A / "compare.json").read_text())
    assert result["cross"]["values"] == pytest.approx([math.sqrt(3) / 2] * 4, abs=1e-6)
    assert result["within"]["values"] == pytest.approx([0.0] * 4, abs=1e-6)
    assert result["cross"]["counts"][17] == 4 and "cross-SAE max cosine similarity" in capsys.readouterr().out
    # An SAE against itself: every element is in B, at cosine 1.
    torch.manual_seed(0)
    C = sae_with_dictionary(tmp_path / "c", F.normalize(torch.randn(16, 40), dim=0))
    E.main(["--compare", str(C), str(C), "--device", "cpu", "--out-dir", str(tmp_path / "cc")])
    cross = json.loads((tmp_path / "cc" / "compare.json").read_text())["cross"]
    assert cross["values"] == pytest.approx([1.0] * 40, abs=1e-6) and max(cross["values"]) <= 1.0
    assert cross["counts"][-1] + cross["below_0"] == 40  # every element counted, in the last bin [0.95, 1]
    # A dictionary of one element: its cross-SAE value, and no within-SAE one (it has no other element).
    one = sae_with_dictionary(tmp_path / "one", torch.tensor([[1.0], [0.0]]))
    E.main(["--compare", str(one), str(A), "--device", "cpu"])
    result = json.loads((one / "compare.json").read_text())
    assert result["cross"]["values"] == pytest.approx([1.0]) and "within" not in result


def test_chunked_max_cosine_equals_the_full_matrix():
    torch.manual_seed(0)
    A, B = F.normalize(torch.randn(37, 8), dim=1), F.normalize(torch.randn(23, 8), dim=1)
    full = A @ B.T
    assert torch.allclose(E.max_cosine(A, B, chunk_elements=50), full.max(1).values)
    within = (A @ A.T).fill_diagonal_(-2.0).max(1).values
    assert torch.allclose(E.max_cosine(A, A, exclude_self=True, chunk_elements=50), within)


def test_saelens_files_hold_the_same_sae(plain_run):
    """What SAELens (version 6) reads from a folder, built from its documentation: cfg.json with the
    standard architecture's fields and a metadata block, and sae_weights.safetensors with W_enc (d_in,
    d_sae), b_enc, W_dec (d_sae, d_in), b_dec in float32. Its standard SAE computes
    relu((x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc) @ W_dec + b_dec; that must be our SAE."""
    cfg = json.loads((plain_run / "cfg.json").read_text())
    config = json.loads((plain_run / "config.json").read_text())
    D, F_ = config["d_model"], config["dict_size"]
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input",
                                "normalize_activations", "reshape_activations")} == {
        "architecture": "standard", "d_in": D, "d_sae": F_, "dtype": "float32", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none"}
    meta = cfg["metadata"]
    assert meta["hook_name"] == f"blocks.{config['layer']}.hook_resid_pre" and meta["model_name"] == "tiny"
    assert meta["context_size"] == config["n_ctx"] and int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["device"] == "cpu" and meta["prepend_bos"] is False
    assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": False}  # HF's residual stream
    w = load_file(str(plain_run / "sae_weights.safetensors"))
    assert {k: (tuple(v.shape), v.dtype) for k, v in w.items()} == {
        "W_enc": ((D, F_), torch.float32), "b_enc": ((F_,), torch.float32),
        "W_dec": ((F_, D), torch.float32), "b_dec": ((D,), torch.float32)}
    x = torch.randn(3, 5, D)
    saelens_out = F.relu((x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    sae, _ = E.load_sae(plain_run)
    assert torch.allclose(saelens_out, sae(x)[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# tutorial.md is true of the file: its names exist, its quoted lines are in it, its CPU commands run

TUTORIAL = (HERE / "tutorial.md").read_text()
SOURCE = (HERE / "e2e_sae.py").read_text()


def fenced_blocks(info: str) -> list[str]:
    """The bodies of the fenced code blocks whose info string is exactly `info` (indented ones too)."""
    bodies = re.findall(r"^( *)```" + re.escape(info) + r"\n(.*?)^\1```", TUTORIAL, flags=re.M | re.S)
    return [textwrap.dedent(body) for _, body in bodies]


def section(number: int) -> str:
    return TUTORIAL.split(f"\n## {number}. ")[1].split("\n## ")[0]


def test_every_name_the_tutorial_gives_exists_in_the_file():
    names = set(re.findall(r"`([A-Za-z_][\w.]*)\(\)`", TUTORIAL))  # functions and methods: `compute_loss()`
    names |= set(re.findall(r"`([A-Z]\w*\.[a-z_]\w*)`", TUTORIAL))  # attributes of classes: `SAE.dictionary`
    names |= set(re.findall(r"`([A-Z][A-Z0-9_]*[A-Z0-9])`", TUTORIAL))  # classes and constants: `SAE`, `TINY_RUN`

    def found(name):
        obj = E
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    assert len(names) > 60 and sorted(n for n in names if not found(n)) == []
    tests = set(re.findall(r"`(test_\w+)`", TUTORIAL))  # the tests an exercise names
    assert tests and tests <= set(globals())


def same_output(printed: str, expected: str):
    """The same text, with every integer equal and every decimal number within 1% (another CPU may
    round the last digit of a float differently)."""
    number = r"(-?\d+\.\d+|-?\d+)"
    got, want = re.split(number, printed.strip()), re.split(number, expected.strip())
    assert len(got) == len(want), (printed, expected)
    for g, w in zip(got, want):
        if re.fullmatch(number, w) and "." in w:
            assert float(g) == pytest.approx(float(w), rel=1e-2, abs=1e-3), (g, w)
        else:
            assert g == w, (g, w)


def test_the_tutorials_numbers_come_from_the_code(tmp_path, monkeypatch, capsys):
    """The work of section 7 and the recorded debugger session of section 4, run again."""
    with torch.device("meta"):  # shapes only: GPT-2 small without memory
        gpt2 = GPT2LMHeadModel(GPT2Config())
    sae = SimpleNamespace(encoder=SimpleNamespace(in_features=768, out_features=46080))
    for loss in ("e2e", "local"):
        flops = E.flops_per_token(gpt2, E.decoder_blocks(gpt2), sae, loss, 6, 1024)
        assert f"{flops / 1e9:.3f}" in section(7) and f"{flops * 409.6e6 / 1e18:.2f} EFLOP" .split()[0] in section(7)
    # The debugger sessions: the same commands fed to pdb give the same answers.
    argvs = re.findall(r"pdb\.runcall\(e2e_sae\.main, '([^']+)'\.split\(\)\)", section(4))
    sessions = re.findall(r"^```\n(> e2e_sae\.py\(.*?)\n```", section(4), flags=re.M | re.S)
    assert len(argvs) == len(sessions) == 3
    monkeypatch.chdir(tmp_path)
    program = ("e2e SAE at", "local SAE at", "e2e_ds SAE at", "trained on", "final:", "wrote ")  # main()'s own
    for argv, session in zip(argvs, sessions):
        commands = re.findall(r"^\(Pdb\) (.*)$", session, flags=re.M)
        recorded = [[line for line in chunk.splitlines() if not line.startswith(program)]
                    for chunk in re.split(r"^\(Pdb\) .*$", session, flags=re.M)]
        answers = io.StringIO()
        bdb.Breakpoint.next, bdb.Breakpoint.bplist, bdb.Breakpoint.bpbynumber = 1, {}, [None]  # a fresh pdb numbers from 1
        debugger = pdb.Pdb(stdin=io.StringIO("\n".join(commands) + "\n"), stdout=answers)
        debugger.use_rawinput = False
        try:
            debugger.runcall(E.main, argv.split())
        finally:
            sys.settrace(None)
        live = answers.getvalue().replace(str(HERE) + "/", "").split("(Pdb) ")
        assert len(live) == len(recorded) == len(commands) + 1
        for got, want in zip(live, recorded):
            same_output("\n".join(line for line in got.splitlines() if line.strip()), "\n".join(want))
    assert "final: ce_loss_orig 7.594" in capsys.readouterr().out


def test_the_tutorials_quoted_lines_and_breakpoints_are_in_the_file():
    lines = [line.strip() for line in SOURCE.splitlines()]
    quoted = [q for q in re.findall(r"`([^`\n]+)`", section(6)) if len(q) >= 20]
    assert len(quoted) >= 20 and [q for q in quoted if q not in SOURCE] == []
    breakpoints = re.findall(r"^b e2e_sae\.py:(\d+) +# (.+)$", TUTORIAL, flags=re.M)
    assert len(breakpoints) == 3
    for number, text in breakpoints:
        assert lines[int(number) - 1] == text.strip(), (number, text)
    # the stops of the recorded session are the lines it says
    for number, text in re.findall(r"^> e2e_sae\.py\((\d+)\)\w+\(\)\n-> (.+)$", TUTORIAL, flags=re.M):
        assert lines[int(number) - 1] == text.strip(), (number, text)
    assert (HERE / "figures" / "kl_vs_l0.png").is_file() and "](figures/kl_vs_l0.png)" in TUTORIAL


def test_the_tutorials_cpu_commands_run(tmp_path, monkeypatch, capsys):
    """Every command in a `bash cpu` block, in order, in one folder (later ones read what earlier ones
    wrote), with training runs cut to one optimiser step; every `python cpu` block executed."""
    monkeypatch.chdir(tmp_path)
    blocks = fenced_blocks("bash cpu")
    analysis = next(b for b in blocks if "--inspect" in b)  # section 3.11's, run at full size: seconds
    assert len([line for b in blocks for line in b.splitlines() if line.strip()]) >= 10
    for block in blocks:
        printed = []
        for line in filter(str.strip, block.splitlines()):
            args = shlex.split(line, comments=True)
            assert args[:2] == ["python", "e2e_sae.py"], line
            args = args[2:]
            if block != analysis and not {"--inspect", "--compare", "--eval-only", "--resume", "--benchmark"} & set(args):
                args += ["--n-samples", "16", "--eval-every", "0"]  # small budgets: one optimiser step
            capsys.readouterr()
            E.main(args)  # an error would exit, and fail the test
            printed.append(capsys.readouterr().out)
        if block == analysis:  # what the tutorial shows of the last two commands is what they print
            shown = section(3).split("The last two printed:\n\n```\n")[1].split("\n```")[0]
            same_output("".join(printed[-2:]), shown)
    snippets = fenced_blocks("python cpu")
    assert snippets
    for code in snippets:
        exec(compile(code, "tutorial.md", "exec"), {})
    assert "'kl': 0.0" in capsys.readouterr().out and (tmp_path / "out/sweep/local_16/sae.safetensors").exists()
    # The figure's code reads the sweep's six runs (matplotlib, not a dependency, stubbed).
    plt, fig, ax = MagicMock(), MagicMock(), MagicMock()
    plt.subplots.return_value = (fig, ax)
    monkeypatch.setitem(sys.modules, "matplotlib", MagicMock(pyplot=plt))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    exec(compile(section(9).split("```python\n")[1].split("\n```")[0], "tutorial.md", "exec"), {})
    assert [(len(c.args[0]), c.kwargs["label"]) for c in ax.plot.call_args_list] == [(3, "e2e"), (3, "local")]
    fig.savefig.assert_called_once_with("figures/kl_vs_l0.png", dpi=150)
