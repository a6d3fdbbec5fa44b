"""Tests for e2e_sae.py (python -m pytest -q test_e2e_sae.py), offline, on tiny random models,
each against an independent computation: the method first (each test read on its own), then the
engineering. One thread per process: results here and in subprocesses stay bitwise comparable."""

import bdb, copy, dataclasses, http.server, io, itertools, json, logging, math, os, pdb, re, shlex
import signal, subprocess, sys, textwrap, threading, time, weakref
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock, patch

import datasets, huggingface_hub, pytest, torch, transformers.masking_utils
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                          GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

import e2e_sae as E

torch.set_num_threads(1)
HERE = Path(__file__).parent
METRIC_KEYS = set("ce_loss_orig ce_loss_sae ce_loss_increase kl l0 alive_dict_elements "
                  "ce_loss_zero kl_zero ce_loss_score kl_score explained_variance mse "
                  "top1_agreement downstream_mse n_eval_tokens".split())
OUTPUT_FILES = {"sae.safetensors", "config.json", "metrics.json", "log.jsonl", "cfg.json",
                "sae_weights.safetensors"}

@pytest.fixture(scope="module")
def tiny():
    model = E.tiny_gpt2().eval().requires_grad_(False)
    return model, E.decoder_blocks(model)

def identity_sae(d_model: int, center=True) -> E.SAE:
    """F = 2D, encoder [I; −I], decoder [I, −I], zero biases: c = (a⁺, a⁻), â = a⁺ − a⁻ = a."""
    sae, eye = E.SAE(d_model, 2 * d_model, center=center), torch.eye(d_model)
    enc = torch.cat([eye, -eye])  # (2D, D); the decoder's weight is enc.T, its columns unit norm
    sae.load_state_dict({"encoder.weight": enc, "encoder.bias": torch.zeros(2 * d_model),
                         "decoder.weight": enc.T, "decoder.bias": torch.zeros(d_model)})
    return sae

def tokens_for(model, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (B, T), generator=g)
def cfg_for(loss="e2e", layer=6, **kw):
    return E.Config(**{"model": "tiny", "dataset": "random", "loss": loss, "layer": layer,
                       "device": "cpu", **kw})

# Hand computations in plain Python, over lists: independent of torch's reductions
def kl_by_hand(logits_p, logits_q):
    """KL(P ‖ Q) averaged over positions, P and Q the softmax of each row of logits."""
    softmax = lambda z: [math.exp(x) / sum(map(math.exp, z)) for x in z]
    kl = lambda p, q: sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
    rows = list(zip(logits_p.flatten(0, -2).tolist(), logits_q.flatten(0, -2).tolist()))
    return sum(kl(softmax(zp), softmax(zq)) for zp, zq in rows) / len(rows)

def mse_by_hand(x, y):
    """The mean over all elements of (x − y)²."""
    return sum((u - v) ** 2 for u, v in zip(x.flatten().tolist(), y.flatten().tolist())) / x.numel()
def l1_by_hand(c):
    """The mean over positions of ‖c‖₁."""
    rows = c.flatten(0, -2).tolist()
    return sum(sum(abs(v) for v in row) for row in rows) / len(rows)


# === The method: the SAE spliced into the residual stream, the three losses, evaluation ==========
@pytest.mark.parametrize("layer, center", itertools.product([0, 6, 11], [True, False]))
def test_identity_dictionary_gives_zero_kl(layer, center):
    """â = a exactly (tutorial exercise 1): every loss is its sparsity term; KL 0, scores 1."""
    model = E.tiny_gpt2().eval().requires_grad_(False)  # 12 blocks, width D = 64, vocabulary 512
    blocks, D, eye = E.decoder_blocks(model), 64, torch.eye(64)
    sae, enc = E.SAE(D, 2 * D, center=center), torch.cat([eye, -eye])  # center: the basis it reads
    sae.load_state_dict({"encoder.weight": enc, "encoder.bias": torch.zeros(2 * D),  # enc: (2D, D)
                         "decoder.weight": enc.T, "decoder.bias": torch.zeros(D)})  # unit columns
    tokens = torch.randint(512, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    for loss in ["local", "e2e", "e2e_ds"] if layer < 11 else ["local", "e2e"]:  # e2e_ds needs L+1
        cfg = E.Config(loss=loss, layer=layer, sparsity_coeff=6.4)  # λ = 6.4 is φ = λ / D = 0.1
        total, terms, c = E.compute_loss(cfg, model, blocks, sae, tokens)
        l1 = 0.1 * c.sum(-1).mean()  # φ · mean ‖c‖₁ = φ · mean ‖a‖₁
        assert torch.allclose(terms["sparsity"], l1), f"{loss}: {terms['sparsity']}, not {l1}"
        assert torch.allclose(total, terms["sparsity"], atol=1e-6), f"{loss}: {total}, {terms}"
        for name in terms.keys() - {"sparsity"}:
            assert abs(terms[name].item()) < 1e-6, f"{loss}: {name} {terms[name].item()}"
    eval_tokens = torch.randint(512, (3, 16), generator=torch.Generator().manual_seed(1))
    m = E.evaluate(model, blocks, sae, eval_tokens, layer, batch_size=2)
    for k, want in {"kl": 0, "ce_loss_increase": 0, "kl_score": 1, "ce_loss_score": 1}.items():
        assert abs(m[k] - want) <= 1e-6, f"{k} {m[k]}"
    exact = {"mse": 0.0, "explained_variance": 1.0, "top1_agreement": 1.0, "n_eval_tokens": 3 * 16}
    for k, want in exact.items():
        assert m[k] == want, f"{k} {m[k]}"
    assert m["kl_zero"] > 0.1, f"KL of the zero-ablated model {m['kl_zero']}"
    assert set(m["downstream_mse"]) == set(range(layer + 1, 12)), f"blocks {m['downstream_mse']}"
    assert max(m["downstream_mse"].values(), default=0.0) <= 1e-10, f"{m['downstream_mse']}"

@pytest.mark.parametrize("layer", [0, 5, 11])
def test_splice_hook_sees_hf_hidden_states_in_either_basis_and_cleans_up(tiny, layer):
    """The hook sees HF's hidden_states[L] (less its mean over D by default), puts â in its place,
    can end the pass, goes; â + k·1 gives the same logits, as LayerNorms read the stream."""
    model, blocks = tiny
    torch.manual_seed(0)
    sae, tokens = E.SAE(64, 128, center=False), tokens_for(model)  # the raw stream first
    clean = model(tokens, output_hidden_states=True)
    a = clean.hidden_states[layer]  # (B, T, D): the input of block L
    ours = E.run_model(model, tokens, hidden_states=True)
    for k, (h, h_hf) in enumerate(zip(ours.hidden_states, clean.hidden_states)):
        assert torch.equal(h, h_hf), f"hidden_states[{k}] off by {(h - h_hf).abs().max()}"
    logits = model.lm_head(ours.last_hidden_state)
    assert torch.equal(logits, clean.logits), f"off by {(logits - clean.logits).abs().max()}"
    with E.splice_sae(blocks[layer], sae) as seen:
        spliced = model(tokens).logits
    for name, got, want in zip("aâc", (seen.a, seen.a_hat, seen.c), (a, *sae(seen.a))):
        assert torch.equal(got, want), f"{name} off by {(got - want).abs().max()}"
    assert not torch.allclose(spliced, clean.logits), "the splice left the logits unchanged"
    with E.splice_sae(blocks[layer], sae, stop=True) as seen:
        assert E.run_model(model, tokens) is None  # ended once the SAE had run
    assert torch.equal(seen.a, a), f"a off by {(seen.a - a).abs().max()}"
    assert seen.c.shape == (2, 16, 128), f"c of shape {seen.c.shape}"
    with pytest.raises(E.StopForward), E.splice_sae(blocks[layer], sae, stop=True):
        model(tokens)
    sae.center, a_c = True, a - a.mean(-1, keepdim=True)  # TransformerLens's basis
    with E.splice_sae(blocks[layer], sae) as seen:
        spliced = model(tokens).logits
    assert torch.allclose(seen.a, a_c, atol=1e-6), f"|a − a_c| {(seen.a - a_c).abs().max()}"
    assert torch.equal(seen.a_hat, sae(seen.a)[0]), "â is not the SAE's output on a"
    for k in (-3.0, 0.5, 20.0):
        moved = copy.deepcopy(sae).requires_grad_(False)
        moved.decoder.bias += k  # â + k·1
        with E.splice_sae(blocks[layer], moved):
            assert torch.allclose(model(tokens).logits, spliced, atol=1e-4), f"k = {k}"
    after = model(tokens).logits
    assert torch.equal(after, clean.logits), f"off by {(after - clean.logits).abs().max()}"
    for k, block in enumerate(blocks):
        assert len(block._forward_pre_hooks) == 0, f"block {k} keeps {block._forward_pre_hooks}"

def test_kl_direction_is_orig_to_sae():
    """P_orig peaked, P_sae flat: KL(orig ‖ sae) ≠ KL(sae ‖ orig); the file's KLs are the first."""
    logits_orig = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 3.0, -1.0]]])  # (B=1, T=2, V=3)
    logits_sae = torch.tensor([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    forward, backward = kl_by_hand(logits_orig, logits_sae), kl_by_hand(logits_sae, logits_orig)
    assert abs(forward - backward) > 0.2, f"KL(orig ‖ sae) {forward}, KL(sae ‖ orig) {backward}"
    kl = E.kl_div(logits_orig, logits_sae).item()
    assert kl == pytest.approx(forward, rel=1e-5), f"kl_div {kl}, KL(orig ‖ sae) {forward}"
    head = SimpleNamespace(weight=torch.eye(3), bias=None)  # W_U = I: hidden states are logits
    kl = E.unembed_kl(logits_orig, logits_sae, head, None).item()
    assert kl == pytest.approx(forward, rel=1e-5), f"unembed_kl {kl}, KL(orig ‖ sae) {forward}"

def test_losses_equal_hand_computations():
    """Each loss of the paper against its formula in plain Python, on random tensors."""
    randn, phi, beta = partial(torch.randn, generator=torch.Generator().manual_seed(0)), 0.5, 2.5
    a, a_hat, c = randn(2, 3, 4), randn(2, 3, 4), randn(2, 3, 6).relu()  # (B, T, D), (B, T, F)
    logits_orig, logits_sae = randn(2, 3, 5) * 2, randn(2, 3, 5) * 2  # (B, T, V)
    resid_orig, resid_sae = ([randn(2, 3, 4) for _ in range(3)] for _ in range(2))  # 3 later blocks
    mse, l1, kl = mse_by_hand(a_hat, a), l1_by_hand(c), kl_by_hand(logits_orig, logits_sae)
    downstream = sum(mse_by_hand(s, o) for s, o in zip(resid_sae, resid_orig)) / 3
    loss, terms = E.local_loss(a, a_hat, c, phi)
    assert loss.item() == pytest.approx(mse + phi * l1, rel=1e-5), f"local {loss.item()}"
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5), f"MSE {terms['mse']}, not {mse}"
    kl_term = E.kl_div(logits_orig, logits_sae)
    loss, _ = E.e2e_loss(kl_term, c, phi)
    assert loss.item() == pytest.approx(kl + phi * l1, rel=1e-5), f"e2e {loss.item()}"
    loss, terms = E.e2e_ds_loss(kl_term, c, resid_orig, resid_sae, phi, beta)
    by_hand = 0.5 * kl + phi * l1 + beta * downstream
    assert loss.item() == pytest.approx(by_hand, rel=1e-5), f"e2e_ds {loss.item()}, not {by_hand}"
    ds = terms["downstream"].item()
    assert ds == pytest.approx(downstream, rel=1e-5), f"downstream {ds}, not {downstream}"

@pytest.mark.parametrize("loss, own", [("local", "mse"), ("e2e", "kl"), ("e2e_ds", "downstream")])
def test_a_few_dozen_steps_reduce_the_loss_and_mse_coeff_adds_alpha_mse(tiny, loss, own):
    """20 steps on a fixed batch cut the total by 30%, and the loss's own term; then φ = λ / D, and
    --mse-coeff α adds α·MSE(â, a) in the SAE's basis (by default 1 for local, else no MSE term)."""
    model, blocks = tiny
    torch.manual_seed(0)
    sae, tokens, history = E.SAE(64, 256), tokens_for(model), []
    cfg = partial(cfg_for, loss, 5, sparsity_coeff=6.4)  # λ = 6.4 at width D = 64: φ = 0.1
    rows = sae.decoder.weight @ sae.decoder.weight.T  # (D, D)
    assert torch.allclose(rows, torch.eye(64), atol=1e-5), "the decoder's rows are not orthonormal"
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(20):
        total, terms, _ = E.compute_loss(cfg(sparsity_coeff=0.5), model, blocks, sae, tokens)
        total.backward()
        opt.step()
        opt.zero_grad()
        history.append({k: v.item() for k, v in {"total": total, **terms}.items()})
    assert history[-1]["total"] < 0.7 * history[0]["total"], (history[0], history[-1])
    assert history[-1][own] < history[0][own], (history[0], history[-1])
    norms = sae.decoder.weight.norm(dim=0)  # (F,): the raw columns moved from √(D/F) = 0.5 ...
    assert not torch.allclose(norms, torch.full_like(norms, 0.5)), f"column norms {norms}"
    unit = sae.dictionary.norm(dim=0)  # ... and D_n's are unit vectors all the same
    assert torch.allclose(unit, torch.ones(256)), f"D_n's column norms {unit}"
    default = float(loss == "local")
    base, base_terms, _ = E.compute_loss(cfg(), model, blocks, sae, tokens)
    same, same_terms, _ = E.compute_loss(cfg(mse_coeff=default), model, blocks, sae, tokens)
    assert torch.equal(base, same), f"{base} with no --mse-coeff, {same} with {default}"
    assert base_terms.keys() == same_terms.keys(), f"terms {list(base_terms)}, {list(same_terms)}"
    assert ("mse" in base_terms) == (loss == "local"), f"terms {list(base_terms)}"
    loss_a, terms, _ = E.compute_loss(cfg(mse_coeff=0.7), model, blocks, sae, tokens)
    h = model(tokens, output_hidden_states=True).hidden_states[5]
    a_c = h - h.mean(-1, keepdim=True)  # centred: the SAE's basis by default
    mse, l1 = mse_by_hand(sae(a_c)[0], a_c), 0.1 * l1_by_hand(sae(a_c)[1])
    by_hand = 0.7 * mse + base.item() - default * mse  # base: α = default, its MSE by hand
    sparsity = base_terms["sparsity"].item()
    assert sparsity == pytest.approx(l1, rel=1e-5), f"φ‖c‖₁ {sparsity}, not 0.1 · {l1 / 0.1}"
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5), f"MSE {terms['mse']}, not {mse}"
    assert loss_a.item() == pytest.approx(float(by_hand), rel=1e-5), f"{loss_a}, not {by_hand}"
    sae.center = False
    raw = E.compute_loss(cfg(mse_coeff=0.7, center=False), model, blocks, sae, tokens)[1]["mse"]
    assert raw.item() == pytest.approx(mse_by_hand(sae(h)[0], h), rel=1e-5), f"raw MSE {raw}"
    assert raw.item() != pytest.approx(mse, rel=1e-3), f"raw MSE {raw} = centred MSE"

@pytest.mark.parametrize("center", [True, False], ids=["centred", "raw"])
def test_evaluate_matches_independent_computations(tiny, center):
    """Every metric against HF's loss and hidden_states, blocks run by hand, and a zero ablation."""
    model, blocks = tiny
    torch.manual_seed(0)
    sae, L, tokens = identity_sae(64, center), 3, tokens_for(model, B=5, T=12, seed=3)
    basis = (lambda h: h - h.mean(-1, keepdim=True)) if center else (lambda h: h)
    with torch.no_grad():
        sae.decoder.weight.add_(0.03 * torch.randn(64, 128))  # changed, not beyond recognition
        sae.decoder.bias.add_(0.1 * torch.randn(64))
        sae.encoder.bias[:10] = -100.0  # these elements never fire
        clean = model(tokens, labels=tokens, output_hidden_states=True)
        a_hat, c = x, _ = sae(basis(clean.hidden_states[L]))  # x: the residual stream, from â on
        for block in blocks[L:]:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
        with E.splice_sae(blocks[L], sae):
            spliced = model(tokens, labels=tokens, output_hidden_states=True)
        with blocks[L].register_forward_pre_hook(lambda b, a: (torch.zeros_like(a[0]), *a[1:])):
            zero = model(tokens, labels=tokens)  # the zero model: block L reads zeros
    by_hand = model.lm_head(model.transformer.ln_f(x))
    off = (spliced.logits - by_hand).abs().max()
    assert torch.allclose(spliced.logits, by_hand, atol=1e-5), f"spliced logits off by {off}"
    m = E.evaluate(model, blocks, sae, tokens, L, batch_size=2)
    p, q, z = (run.logits.log_softmax(-1) for run in (clean, spliced, zero))
    a, a_hat = (t.double().numpy().reshape(-1, 64) for t in (basis(clean.hidden_states[L]), a_hat))
    kl, kl_zero = ((p.exp() * (p - r)).sum(-1).mean().item() for r in (q, z))  # KL(P_orig ‖ ·)
    ce_orig, ce_sae, ce_zero = clean.loss.item(), spliced.loss.item(), zero.loss.item()  # HF's
    agree = clean.logits.argmax(-1) == spliced.logits.argmax(-1)  # (B, T)
    expected = {"ce_loss_orig": ce_orig, "ce_loss_sae": ce_sae, "ce_loss_zero": ce_zero,  # B·(T−1)
                "ce_loss_increase": ce_sae - ce_orig, "kl": kl, "kl_zero": kl_zero,
                "ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_orig), "n_eval_tokens": 5 * 12,
                "kl_score": (kl_zero - kl) / kl_zero, "l0": (c > 0).float().sum(-1).mean().item(),
                "mse": ((a - a_hat) ** 2).mean(), "top1_agreement": agree.float().mean().item(),
                "alive_dict_elements": int((c > 0).reshape(-1, 128).any(0).sum()),
                "explained_variance": 1 - ((a - a_hat) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()}
    alive, top1 = expected["alive_dict_elements"], expected["top1_agreement"]
    assert 0 < alive <= 118, f"{alive} elements alive: the test would check little"
    assert 0 < top1 < 1, f"top-1 agreement {top1}: the test would check little"
    assert set(m) == METRIC_KEYS, f"metrics {sorted(m)}"
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    shift = torch.from_numpy(a_hat.mean(-1)).view(5, 12, 1) if center else 0  # â's mean stays
    for k in range(L + 1, 12):
        d = (basis(spliced.hidden_states[k]) + shift - basis(clean.hidden_states[k])).double()
        assert m["downstream_mse"][k] == pytest.approx(d.pow(2).mean().item(), rel=1e-4), k

@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 100])
def test_unembed_kl_equals_kl_of_full_logits_and_its_gradient(chunk_rows):
    """The chunked KL from hidden states: kl_div's on the full logits, and autograd's gradient."""
    g, (B, T, D, V) = torch.Generator().manual_seed(1), (2, 5, 4, 7)
    randn, head = partial(torch.randn, generator=g), torch.nn.Linear(D, V).requires_grad_(False)
    head.load_state_dict({"weight": randn(V, D), "bias": randn(V)})  # drawn in this order
    h_orig, h_sae = randn(B, T, D), randn(B, T, D, requires_grad=True)
    h_ref = h_sae.detach().clone().requires_grad_(True)
    kl, ref = E.unembed_kl(h_orig, h_sae, head, chunk_rows), E.kl_div(head(h_orig), head(h_ref))
    (3.0 * kl + 3.0 * ref).backward()  # h_sae's gradient from kl, h_ref's from ref
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl.item() == pytest.approx(kl_by_hand(head(h_orig), head(h_ref)), rel=1e-5)
    assert torch.allclose(h_sae.grad, h_ref.grad, atol=1e-6)


# === The engineering: fast paths, data, the CLI, checkpoints, processes, speed, --inspect, tutorial

# --- The training path equals the plain computation
@contextmanager
def block_inputs(blocks, ks):
    """The inputs of blocks ks in the next forward pass, read by hooks of the test's own."""
    seen = {}
    hook = lambda k: lambda m, args, kw: seen.update({k: args[0] if args else kw["hidden_states"]})
    with ExitStack() as hooks:  # removed on the way out
        for k in ks:
            hooks.enter_context(blocks[k].register_forward_pre_hook(hook(k), with_kwargs=True))
        yield seen

def reference_loss(cfg, model, blocks, sae, tokens):
    """The e2e losses the plain way: full (B, T, V) logits, kl_div, streams read by hooks."""
    L, phi = cfg.layer, cfg.sparsity_coeff / sae.encoder.in_features
    ds = range(L + 1, len(blocks)) if cfg.loss == "e2e_ds" else []
    with torch.no_grad(), block_inputs(blocks, ds) as orig:
        logits_orig = model(tokens).logits
    with E.splice_sae(blocks[L], sae) as seen, block_inputs(blocks, ds) as spliced:
        logits_sae = model(tokens).logits
    kl = E.kl_div(logits_orig, logits_sae)
    if cfg.loss == "e2e":
        return E.e2e_loss(kl, seen.c, phi, cfg.kl_coeff)
    basis = lambda h: h - h.mean(-1, keepdim=True) * sae.center
    shift = seen.a_hat.mean(-1, keepdim=True) * sae.center
    resid_orig, resid_sae = [basis(orig[k]) for k in ds], [basis(spliced[k]) + shift for k in ds]
    return E.e2e_ds_loss(kl, seen.c, resid_orig, resid_sae, phi, cfg.downstream_coeff, cfg.kl_coeff)

@pytest.fixture(scope="module")
def other_models():
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    neox = GPTNeoXConfig(**{**small, "num_attention_heads": 2, "vocab_size": 100})
    # qwen: blocks 2 and 3 attend over a sliding window of 8 positions, 0 and 1 over all
    qwen = Qwen2Config(**small, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    # gemma: alternating sliding-window and global layers, each kind with its own rotary embeddings
    gemma = Gemma3TextConfig(**small, head_dim=8, sliding_window=8, sliding_window_pattern=2)
    models = {"llama": LlamaForCausalLM(LlamaConfig(**small)), "neox": GPTNeoXForCausalLM(neox),
              "qwen": Qwen2ForCausalLM(qwen), "gemma": Gemma3ForCausalLM(gemma)}
    return {k: m.eval().requires_grad_(False) for k, m in models.items()}

@pytest.mark.parametrize("arch, loss, layer", [
    ("gpt2", "e2e", 5), ("gpt2", "e2e_ds", 0), ("gpt2", "e2e_ds", 10), ("llama", "e2e_ds", 1),
    ("neox", "e2e", 2), ("qwen", "e2e_ds", 1), ("gemma", "e2e", 0)])
def test_fast_path_matches_the_plain_computation(tiny, other_models, arch, loss, layer):
    """compute_loss (unembed_kl in ragged chunks; fp32, bf16) against reference_loss in fp32."""
    model = tiny[0] if arch == "gpt2" else other_models[arch]
    blocks, D = E.decoder_blocks(model), model.config.hidden_size
    cfg = cfg_for(loss, layer, center=arch in ("gpt2", "neox"))  # as setup() decides: LayerNorm
    torch.manual_seed(0)
    sae, tokens = E.SAE(D, 4 * D, center=cfg.center), tokens_for(model, B=2, T=32)
    sae.encoder.bias.data.add_(0.3)  # more active elements: a KL well away from 0
    ref_loss, ref_terms = reference_loss(cfg, model, blocks, sae, tokens)
    ref_grads = torch.autograd.grad(ref_loss, list(sae.parameters()))
    assert ref_terms["kl"] > 1e-3, f"KL {ref_terms['kl']}: the test would check little"
    for bf16, rel in ((False, 1e-5), (True, 1e-2)):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # chunks: 37 ∤ 64 rows
            loss, terms, _ = E.compute_loss(cfg, model, blocks, sae, tokens, kl_chunk_rows=37)
        loss.backward()
        assert all(p.grad is None for p in model.parameters()), "the frozen model got a gradient"
        for k in ref_terms:
            assert terms[k].item() == pytest.approx(ref_terms[k].item(), rel=rel), (k, bf16)
        for p, g_ref in zip(sae.parameters(), ref_grads):
            assert (p.grad - g_ref).norm() / g_ref.norm() < (5e-2 if bf16 else 1e-5), bf16

class Probe(TorchDispatchMode):
    """The largest tensor made, and FLOPs by torch's formulas (FlopCounterMode misses unembed_kl)"""
    largest = flops = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest] + sizes)
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out

def test_each_loss_runs_what_it_counts_no_batch_by_vocabulary_tensor_and_fp32_logits():
    """local runs blocks 0 … L−1, e2e the model twice, no (B, T, V) tensor; FLOPs as torch's. In
    bf16 autocast the blocks' matmuls and â are bf16; the logits and â as block L reads it, fp32."""
    model = E.tiny_gpt2().eval().requires_grad_(False)  # a model of its own, for the hooks
    model.config._attn_implementation = "eager"  # whose matmuls the count sees on the CPU
    blocks, calls, sae, (B, T, V) = E.decoder_blocks(model), [], E.SAE(64, 128), (2, 64, 512)
    for k, b in enumerate(blocks):
        b.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
    model.lm_head.register_forward_hook(lambda m, i, o: calls.append(("lm_head", i[0].dim())))
    for loss, L, expected in [("local", 4, [0, 1, 2, 3]), ("e2e", 7, [*range(12)] * 2)]:  # no head
        calls.clear()
        E.compute_loss(cfg_for(loss, L), model, blocks, sae, tokens_for(model))
        assert calls == expected, f"{loss} ran {calls}"
    tokens = tokens_for(model, B=B, T=T)  # F = 128 < V: c is smaller than (B, T, V)
    for loss in ("local", "e2e", "e2e_ds"):
        with Probe() as probe:
            cfg = cfg_for(loss, 4)
            E.compute_loss(cfg, model, blocks, sae, tokens, kl_chunk_rows=16)[0].backward()
        counted = E.flops_per_token(model, blocks, sae, loss, 4, T) * tokens.numel()
        assert probe.flops == counted, f"{loss}: torch counts {probe.flops}, we {counted}"
        assert B * T * V > probe.largest >= (16 * V if loss != "local" else 0), probe.largest
        if loss != "local":  # the probe does see the plain way's (B, T, V) logits
            with Probe() as probe:
                reference_loss(cfg, model, blocks, sae, tokens)[0].backward()
            assert probe.largest >= B * T * V, f"the largest tensor of {probe.largest} elements"
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        qkv = blocks[0].attn.c_attn(torch.randn(2, 64))
        logits = E.unembed(model.lm_head, E.run_model(model, tokens_for(model)).last_hidden_state)
        with E.splice_sae(blocks[6], identity_sae(64)) as seen, block_inputs(blocks, [6]) as enter:
            E.run_model(model, tokens_for(model))
    bf16 = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    m = E.evaluate(model, blocks, identity_sae(64), tokens_for(model), 6, 2, bf16)
    assert qkv.dtype == torch.bfloat16, f"the blocks' matmuls in {qkv.dtype}"  # bf16 inside
    assert logits.dtype == torch.float32, f"the logits in {logits.dtype}"
    assert seen.a_hat.dtype == torch.bfloat16, f"â in {seen.a_hat.dtype}"
    assert enter[6].dtype == torch.float32, f"â as the next block reads it in {enter[6].dtype}"
    assert 0 <= m["kl"] < 0.05, f"KL {m['kl']}"
    assert m["explained_variance"] > 0.99, f"explained variance {m['explained_variance']}"

# --- Models and data
def test_models_load_frozen_fused_with_findable_blocks(tmp_path, capsys, other_models):
    """Models load frozen, with SDPA and GPT-2's fused GELU; RMSNorm models keep the raw stream."""
    assert E.load_model("tiny", torch.device("cpu"))[0].config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512,
                                      initializer_range=0.2, activation_function="gelu_new"))
    for name, m in dict(gpt2=gpt2, llama=other_models["llama"], neox=other_models["neox"]).items():
        m.save_pretrained(tmp_path / name)
    for name in ("gpt2", "neox", "llama"):  # no tokenizer files: no tokenizer
        model, tokenizer = E.load_model(str(tmp_path / name), torch.device("cpu"))
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
        assert tokenizer is None, tokenizer
        assert not model.training, f"{name} in training mode"
        assert not any(p.requires_grad for p in model.parameters()), f"{name} is not frozen"
        if name == "gpt2":
            act, tokens = model.transformer.h[0].mlp.act, tokens_for(model, T=64)
            assert isinstance(act, torch.nn.GELU), act
            assert act.approximate == "tanh", act.approximate
            difference = (model(tokens).logits - gpt2.eval()(tokens).logits).abs().max().item()
            assert difference < 1e-4, f"largest logit difference {difference}"
    blocks, tokens, sae = E.decoder_blocks(model), tokens_for(model), identity_sae(32, False)
    hidden = model(tokens, output_hidden_states=True).hidden_states
    with E.splice_sae(blocks[2], sae) as seen:
        spliced = model(tokens).logits
    logits = model(tokens).logits
    assert torch.equal(seen.a, hidden[2]), f"a off by {(seen.a - hidden[2]).abs().max()}"
    assert torch.allclose(spliced, logits, atol=1e-5), f"off by {(spliced - logits).abs().max()}"
    for loss in ("local", "e2e_ds"):
        metrics = E.train(cfg_for(loss, 2, model=str(tmp_path / "llama"), n_samples=16, n_ctx=16,
                                  batch_size=2, grad_accum=2, eval_samples=4, dict_ratio=2,
                                  out_dir=str(tmp_path / loss)))
        config = check_output_folder(tmp_path / loss, loss, 4, 2)[1]
        assert set(metrics) == METRIC_KEYS, sorted(metrics)
        assert set(metrics["downstream_mse"]) == {3}, metrics["downstream_mse"]
        assert config["center"] is False, "RMSNorm: TransformerLens does not centre it, nor do we"
    said = f"e2e_ds SAE at layer 2 of {tmp_path}/llama (uncentred stream): D=32 F=64 λ=10 β=2.5 |"
    assert said in capsys.readouterr().out
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for name, dtype in (("neox", "bf16"), ("llama", "fp32"), ("gpt2", "bf16")):
        E.setup(cfg := cfg_for(layer=1, model=str(tmp_path / name), dtype=dtype))
        assert cfg.center is (name != "llama"), f"{name}: only LayerNorm models are centred"
        assert torch.backends.cuda.matmul.allow_tf32 is (dtype == "bf16"), dtype  # for bf16 runs
        assert torch.backends.cudnn.allow_tf32 is (dtype == "bf16"), dtype
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert E.decoder_blocks(other_models["neox"]) is other_models["neox"].gpt_neox.layers
    assert len(other_models["neox"].gpt_neox.layers) == 4, len(other_models["neox"].gpt_neox.layers)
    with pytest.raises(E.UserError, match="cannot find the decoder blocks"):
        E.decoder_blocks(torch.nn.Linear(2, 2))
    gpt2.config.final_logit_softcapping = 30.0  # as Gemma 2 has
    gpt2.save_pretrained(tmp_path / "capped")
    with pytest.raises(E.UserError, match="soft-caps its logits"):
        E.setup(cfg_for("e2e", 1, model=str(tmp_path / "capped")))

def write_sources(folder, rows):
    """The same pre-tokenised rows as a save_to_disk folder, a .jsonl and a .parquet file."""
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    names = ("disk", "rows.jsonl", "rows.parquet")
    for save, name in zip((ds.save_to_disk, ds.to_json, ds.to_parquet), names):
        save(str(folder / name))
    return [str(folder / name) for name in names]

@pytest.mark.parametrize("streamed", [False, True])
def test_eval_and_training_sequences_never_overlap_seed_sets_order(tmp_path, monkeypatch, streamed):
    """Each epoch reads every sequence but the first (held out) once, in an order the seed sets.
    `random` is endless: streamed, never held; its first sequences are held out all the same."""
    cfg = E.Config(dataset="random", n_ctx=16, eval_samples=5, shuffle_buffer=4)  # unpatched
    eval_tokens, train = E.load_data(cfg, None, 512)
    held_out = {tuple(row) for row in eval_tokens.tolist()}
    trained = {tuple(next(train).tolist()) for _ in range(200)}
    seed_7 = E.load_data(dataclasses.replace(cfg, seed=7), None, 512)[0]
    assert torch.equal(eval_tokens, seed_7), "--seed 7 changed the evaluation set"
    assert eval_tokens.max() < 512, f"token id {eval_tokens.max()} in a vocabulary of 512"
    assert not held_out & trained, f"{len(held_out & trained)} held-out sequences trained on"
    monkeypatch.setattr(E, "is_streamed", lambda dataset: streamed)  # then files, held or streamed
    rows = [list(range(i, i + 8 + i % 3)) for i in range(40)]  # row i: [i, i+1, ...], 8 to 10 long
    rows.insert(5, [1, 2, 3])  # too short: skipped
    sequences = [tuple(row[:8]) for row in rows if len(row) >= 8]  # 40 of n_ctx = 8 tokens
    held_out, others = sequences[:10], sequences[10:]
    def three_epochs(cfg, seed=0):  # of the 30 sequences not held out
        train = E.load_data(dataclasses.replace(cfg, seed=seed), None, 512)[1]
        return [tuple(next(train).tolist()) for _ in range(3 * 30)]
    for source in write_sources(tmp_path, rows):
        cfg = E.Config(dataset=source, n_ctx=8, eval_samples=10, shuffle_buffer=7)
        eval_tokens, trained = E.load_data(cfg, None, 512)[0], three_epochs(cfg)
        first, second = trained[:30], trained[30:60]
        assert [tuple(row) for row in eval_tokens.tolist()] == held_out, source
        assert not set(trained) & set(held_out), f"{source}: {set(trained) & set(held_out)}"
        assert sorted(first) == sorted(others), f"{source}: epoch 1 is {first}"
        assert sorted(second) == sorted(others), f"{source}: epoch 2 is {second}"
        assert first != others, f"{source}: epoch 1 is in the file's order"
        assert first != second, f"{source}: epochs 1 and 2 are in the same order"
        if not streamed:  # a whole shuffle: the file's end can come first
            assert any(row[0] >= 30 for row in trained[:5]), f"{source}: epoch 1 begins {first[:5]}"
        assert three_epochs(cfg) == trained, f"{source}: seed 0 gave {trained}, then another order"
        assert three_epochs(cfg, 1) != trained, f"{source}: seeds 0 and 1 both gave {trained}"

def make_tokenizer(folder: Path, texts):
    """A word-level HF tokenizer built offline, saved in folder; like Llama's, it prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<eos>", "<bos>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    bos = ("<bos>", tok.token_to_id("<bos>"))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>")
    fast.save_pretrained(folder)
    return fast

# --- Configuration and the command line
def test_the_paper_run_needs_no_other_flag_presets_yield_to_flags_and_the_lr_schedule(tmp_path):
    local = Path(write(tmp_path, "my-model/config.json", json.dumps({"n_layer": 12}))).parent
    paper_run = dict(model="gpt2", dataset=E.PAPER_DATASET, n_ctx=1024, n_samples=400_000,
                     batch_size=8, grad_accum=2, lr=5e-4, warmup_samples=20_000, lr_min_ratio=0.1,
                     grad_clip=10.0, dict_ratio=60.0, eval_samples=500, sparsity_coeff=3.0,
                     kl_coeff=1.0, out_dir="out/gpt2_e2e_layer6", center=True)  # TransformerLens's basis
    cpu_bench = dict(model="gpt2-random", dataset="random", loss="e2e", layer=6, dict_ratio=60,
                     batch_size=1, n_ctx=128, grad_accum=1, bench_warmup=1, bench_steps=3)
    for argv, expected in [
            ("--loss e2e --layer 6", paper_run),
            ("--loss local", dict(sparsity_coeff=4.0)),
            ("--loss e2e_ds", dict(sparsity_coeff=50.0, kl_coeff=0.5, downstream_coeff=2.5)),
            ("--loss e2e_ds --layer 8", dict(sparsity_coeff=9.354, downstream_coeff=0.3536)),
            ("--loss e2e_ds --layer 8 --downstream-coeff 1", dict(downstream_coeff=1.0)),
            ("--no-center", dict(center=False)),
            ("--loss e2e_ds --sparsity-coeff 7 --kl-coeff 1", dict(sparsity_coeff=7.0)),
            ("--model tiny --n-ctx 64", {**E.TINY_RUN, "n_ctx": 64}),
            # default folders, out/<model>_<loss>_layer<L>: tiny, GPT-2, a hub id, a local folder
            ("--model tiny", dict(out_dir="out/tiny_e2e_layer6")),
            ("--model EleutherAI/pythia-70m --layer 3", dict(out_dir="out/pythia-70m_e2e_layer3")),
            (f"--model {local} --loss local", dict(out_dir="out/my-model_local_layer6")),
            ("--benchmark --device cpu", cpu_bench),
            ("--benchmark --device cuda --loss local",
             dict(batch_size=8, n_ctx=1024, grad_accum=1, bench_warmup=3, bench_steps=10)),
            ("--benchmark --device cpu --model tiny --n-ctx 64 --bench-steps 5",
             dict(model="tiny", n_ctx=64, bench_steps=5, batch_size=1))]:
        cfg = E.parse_config(argv.split())
        for name, want in expected.items():
            assert getattr(cfg, name) == want, f"{argv}: {name} {getattr(cfg, name)}, not {want}"
    # layer 8's are the geometric means of layers 6 and 10's, to 4 significant digits
    assert 9.354 == float(f"{math.sqrt(50 * 1.75):.4g}"), "λ of e2e_ds at layer 8"
    assert 0.3536 == float(f"{math.sqrt(2.5 * 0.05):.4g}"), "β of e2e_ds at layer 8"
    paper = {2: (0.8, 0.5, 10, 2.5), 6: (4, 3, 50, 2.5), 10: (6, 1.5, 1.75, 0.05)}  # λ ×3; β
    for layer, lam in [(0, paper[2]), (1, paper[2]), *paper.items(), (11, paper[10])]:
        runs = [E.parse_config(f"--loss {loss} --layer {layer}".split())
                for loss in ("local", "e2e", "e2e_ds")]
        assert (*(r.sparsity_coeff for r in runs), runs[2].downstream_coeff) == lam, layer
    flags = set(E.build_parser()._option_string_actions)  # a flag per field: n_samples, --n-samples
    assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(E.Config)} <= flags
    assert "--n-samples" in flags
    f = lambda s: E.lr_factor(s, warmup_steps=10, total_steps=111, min_ratio=0.1)  # steps 0 … 110
    assert [f(0), f(9), f(10), f(60), f(110)] == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1])
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    short = [E.lr_factor(s, warmup_steps=8, total_steps=4, min_ratio=0.1) for s in range(4)]
    assert short[-1] == pytest.approx(0.1), short  # a warm-up longer than the run
    assert max(short) == pytest.approx(1.0), short

def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
def write(folder: Path, name: str, data) -> str:
    """folder/name holding data (text or bytes), its folders made: its path."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(folder / name)
def sae_dir(folder: Path, d_model=64, dict_size=8, config=None, sae=None, dictionary=None) -> str:
    """folder holding sae.safetensors (of `sae`, or with `dictionary`'s columns), config.json."""
    sae = sae or E.SAE(*(dictionary.shape if dictionary is not None else (d_model, dict_size)))
    if dictionary is not None:
        sae.decoder.weight.data.copy_(dictionary)
    E.save_sae(sae, Path(write(folder, "sae.safetensors", b"")))
    return str(folder) if config is None else str(Path(write(folder, "config.json", config)).parent)
def new_run(d_model=64, dict_size=256):
    """What save_checkpoint and load_checkpoint need of a run: the SAE and Adam."""
    sae = E.SAE(d_model, dict_size)
    return SimpleNamespace(sae=sae, optimizer=torch.optim.Adam(sae.parameters()))
def bad_checkpoint(p, kind):
    """A run folder of the tiny model, its checkpoint.pt cut short, or its first bytes zeroed."""
    write(p, "run/config.json", json.dumps({"model": "tiny", "dataset": "random", "device": "cpu"}))
    E.save_checkpoint(p / "run", new_run(), 1, 0.0)
    data = (p / "run" / "checkpoint.pt").read_bytes()
    write(p, "run/checkpoint.pt", data[:len(data) // 3] if kind == "cut" else bytes(64) + data[64:])
    return str(p / "run")

rows = lambda p, *rows: write(p, "rows.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
inspect = lambda p, *a, width=64: ["--inspect", "--sae", sae_dir(p, width, 8), "--layer", "3", *a]
init = lambda p, *args, **cfg: ["--init-from", saelens_dir(p / "s", **cfg)[0], *args]
ev = lambda sae, *args: ["--eval-only", "--sae", sae, *args]
tiny_ds = lambda path: ["--dataset", path, "--n-ctx", "4", "--eval-samples", "1"]

def sae_file(folder: Path, **shapes) -> str:
    """folder/sae.safetensors of a 64 × 8 SAE's tensors, those named in `shapes` of that shape."""
    layout = {"W_enc": (64, 8), "b_enc": (8,), "W_dec": (8, 64), "b_dec": (64,)}
    tensors = {k: torch.zeros(shapes.get(k, shape)) for k, shape in layout.items()}
    save_file(tensors, write(folder, "sae.safetensors", b""))
    return str(folder)
GPT2_3_BLOCKS = '{"model_type": "gpt2", "n_layer": 3}'
weightless = lambda p: str(Path(write(p, "m/config.json", GPT2_3_BLOCKS)).parent)  # no weights

def exits(argv, capture):
    """main(argv) as a user runs it: its exit code and what it said on stderr."""
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    return e.value.code, capture.readouterr().err

NOT_READABLE = "config.json is not a readable run configuration"
NOT_VALID = "checkpoint.pt is not a valid checkpoint for this run"
HELD = ("out already holds %s run \\(%s\\): pass --overwrite to replace it, or another --out-dir "
        "\\(with no checkpoint.pt, there is nothing to --resume\\)$")
@pytest.mark.parametrize("args, message", [
    (["--layer", "12"], "--layer 12 is outside the model's blocks 0 … 11"),
    (["--loss", "e2e_ds", "--layer", "11"],
     "--loss e2e_ds needs a block after --layer; 11 is the model's last"),
    (["--loss", "l2"], "--loss must be one of local, e2e, e2e_ds, not 'l2'"),
    (["--sparsity-coeff", "-1"], "--sparsity-coeff must be a finite number ≥ 0, not -1.0"),
    (["--downstream-coeff", "nan"], "--downstream-coeff must be a finite number ≥ 0, not nan"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast' \\(see --help\\)"),
    (["--lr", "-0.1"], "--lr must be a finite number ≥ 0, not -0.1"),
    (["--lr-min-ratio", "2"], "--lr-min-ratio must be between 0 and 1"),
    (["--dict-ratio", "0"], "--dict-ratio must be > 0, not 0.0"),
    (["--dict-ratio", "0.001"], "--dict-ratio 0.001 × width 64 leaves no dictionary element"),
    (["--batch-size", "-4"], "--batch-size must be a finite number ≥ 0, not -4"),
    (["--batch-size", "0"], "--batch-size must be > 0, not 0"),
    (["--eval-samples", "0"], "--eval-samples must be > 0, not 0"),
    (["--n-samples", "3"], "--n-samples 3 is less than one optimiser step"),
    (["--n-ctx", "1"], "--n-ctx must be at least 2"),
    (["--n-ctx", "4096"], "--n-ctx 4096 is longer than the model's context of 1024 tokens"),
    (["--dtype", "fp16"], "--dtype must be bf16 or fp32, not 'fp16'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--device", "cdua"], "--device must be a device such as cpu, cuda or cuda:1, not 'cdua'"),
    (["--device", "cuda:99"], "--device cuda:99 is not usable here"),
    (lambda p: ["--model", str(p / "nothing_here")], "nothing_here: no such folder"),
    (lambda p: ["--out-dir", write(p, "afile", "") + "/run"], "cannot write .*/run/config.json"),
    # a run already in --out-dir: both ways on, --overwrite and --resume (or why there is none)
    (lambda p: write(p, "out/metrics.json", "{}") and [], HELD % ("a finished", "metrics.json")),
    (lambda p: write(p, "out/log.jsonl", "{}") and [], HELD % ("an unfinished", "log.jsonl")),
    # datasets: one line each, none of what the libraries print (C-level writes, log handlers)
    (lambda p: ["--dataset", str(p / "nope.jsonl")], "nope.jsonl: no such file or folder"),
    (lambda p: ["--dataset", write(p, "empty.jsonl", "")], "empty.jsonl is an empty file"),
    (lambda p: ["--dataset", write(p, "b.jsonl", '{"input_ids": [1, 2\n')],
     "cannot read dataset .*JSON parse error"),
    (lambda p: ["--dataset", str(Path(write(p, "txt/a.txt", bytes(range(256)))).parent)],
     "cannot read dataset '.*txt' \\('utf-8' codec can't decode"),
    (lambda p: ["--dataset", rows(p, {"text": "a b"})],
     "holds text, and the model has no tokenizer with an EOS token"),
    (lambda p: ["--dataset", rows(p, {"tokens": [1, 2]})],
     "an 'input_ids' or a 'text' column; these have \\['tokens'\\]"),
    (lambda p: ["--dataset", write_sources(p, [[1, 2, 3]] * 4)[2], "--n-ctx", "16"],
     "holds only 0 sequences of 16 tokens, fewer than --eval-samples 32"),
    (lambda p: tiny_ds(write_sources(p, [[600] * 4])[0]),
     "the dataset has token id 600, beyond the model's vocabulary of 512"),
    # training rows are checked too, not only the evaluation set
    (lambda p: tiny_ds(rows(p, {"input_ids": [1] * 4}, {"input_ids": [600] * 4})), "token id 600"),
    (lambda p: write(p, "out/config.json", "{}") and [  # an earlier run stays as it was
        "--dataset", write_sources(p, [[1] * 4] * 2)[0], "--n-ctx", "4", "--eval-samples", "2",
        "--overwrite"], "has no sequences left for training after the 2 evaluation sequences"),
    (["--eval-only"], "--eval-only and --inspect need --sae DIR"),  # saved SAEs and runs
    (lambda p: ev(str(p), "--layer", "3"), "holds no sae.safetensors"),
    (lambda p: ev(str(Path(write(p, "sae.safetensors", "garbage")).parent), "--layer", "3"),
     "sae.safetensors is not a valid SAE file"),
    (lambda p: ev(sae_dir(p)), "has no config.json: pass --model and --layer"),
    (lambda p: ev(sae_dir(p, config="{broken")), NOT_READABLE),
    (lambda p: ["--compare", sae_dir(p, config="[1, 2]"), str(p)], NOT_READABLE),
    (lambda p: ["--resume", str(p)], "holds no checkpoint.pt to resume from"),
    (lambda p: ["--resume", bad_checkpoint(p, "cut")], NOT_VALID),
    (lambda p: ["--resume", bad_checkpoint(p, "zeroed")], NOT_VALID),
    (lambda p: ["--resume", bad_checkpoint(p, "zeroed"), "--overwrite"],
     "--overwrite True contradicts the run in"),
    (["--inspect"], "--eval-only and --inspect need --sae DIR"),
    (lambda p: inspect(p, "--features", "2,x"),
     "--features takes comma-separated numbers, not '2,x'"),
    (lambda p: inspect(p, "--features", ""), "--features takes comma-separated numbers, not ''"),
    (lambda p: inspect(p, "--features", "8"), "--features 8: the dictionary has elements 0 … 7"),
    (lambda p: inspect(p, "--inspect-samples", "0"), "--inspect-samples must be > 0, not 0"),
    (lambda p: inspect(p, width=32), "reads width 32, but tiny has 64"),
    (lambda p: ["--compare", sae_dir(p), str(p / "nowhere")], "nowhere: no such folder"),
    (lambda p: init(p, architecture="topk"),
     "holds a SAELens topk SAE \\(relu\\), which this file's SAE cannot represent"),
    (lambda p: ev(saelens_dir(p / "s", flat=True, activation_fn_str="topk")[0]),
     "holds a SAELens standard SAE \\(topk\\)"),
    (lambda p: init(p, normalize_activations="layer_norm"),
     "normalises its input by 'layer_norm' without its factor in activation_scaler.json"),
    (lambda p: init(p, weights=False), "s has no sae_weights.safetensors"),
    (lambda p: init(p, flat=True, hook_name="blocks.3.hook_mlp_out"),
     "holds an SAE of blocks.3.hook_mlp_out, not of blocks.L.hook_resid_pre"),
    (lambda p: init(p, "--layer", "4"),
     "--layer 4 does not fit the SAE in .*s, saved with --layer 3"),
    (lambda p: init(p, flat=True, activation_fn="topk"), "SAELens standard SAE \\(topk\\)"),
    (lambda p: init(p, scale=-1.0), "scaler.json's scaling factor -1.0 is not positive"),
    (lambda p: ["--init-from", sae_dir(p / "out"), "--overwrite"],
     "--out-dir is the folder of the SAE in --init-from, which the run would overwrite"),
    (lambda p: init(p, "--no-center"),
     "--center False does not fit the SAE in .*s, saved with --center True"),
    (lambda p: init(p, d_in=32), "the SAE in .*s reads width 32, but tiny has 64"),
    (lambda p: ev(paper_checkpoint(p / "x.pt", ("encoder.0.weight", "pos_embed"))[0]),
     "x.pt holds blocks-3-hook_resid_pre.encoder.0.weight, blocks-3-hook_resid_pre.pos_embed…, "
     "not one SAE of the"),
    (lambda p: ev(write(p, "y.pt", "not a checkpoint")), "y.pt is not a checkpoint of the paper's"),
    (lambda p: ["--compare", sae_dir(p / "a"), sae_dir(p / "b", 32, 8)],
     "the SAEs read different widths \\(64 and 32\\): they cannot be compared"),
    (lambda p: ["--compare", sae_dir(p / "a"), sae_dir(p / "b"), "--device", "cuda:99"],
     "--device cuda:99 is not usable here"),
    # paths that cannot serve: said before any library's progress bar
    (lambda p: ev(str(p / "gone"), "--layer", "3"), "gone: no such folder"),
    (lambda p: ["--init-from", str(p / "gone")], "gone: no such folder"),
    (lambda p: ev(sae_file(p / "s", W_dec=(8, 32)), "--layer", "3"),
     "sae.safetensors: b_enc, W_dec, b_dec have shapes \\[\\(8,\\), \\(8, 32\\), \\(64,\\)\\], "
     "expected \\[\\(8,\\), \\(8, 64\\), \\(64,\\)\\] \\(W_enc's is \\(64, 8\\)\\)$"),
    (lambda p: ["--init-from", sae_file(p / "s", b_enc=(9,))],
     "sae.safetensors: b_enc, W_dec, b_dec have shapes \\[\\(9,\\), "),
    # a .pt holding a pickled module: loading it would run code, and weights_only refuses it
    (lambda p: torch.save(torch.nn.Linear(2, 2), p / "m.pt") or ev(str(p / "m.pt"), "--layer", "3"),
     "m.pt is not a checkpoint of the paper's library \\(Weights only load failed\\)$"),
    (lambda p: ["--model", weightless(p), "--layer", "99"],
     "--layer 99 is outside the model's blocks 0 … 2$"),
    (lambda p: ["--model", weightless(p), "--layer", "1"],
     "m' \\(Error no file named model.safetensors, or pytorch_model.bin, found in directory"),
])
def test_bad_input_is_one_sentence_and_a_nonzero_exit(tmp_path, monkeypatch, capfd, args, message):
    """main() says each mistake in a line on stderr, exits 2, leaves the output folder as it was."""
    for handler in logging.getLogger("datasets").handlers:  # made at import: to this test's stderr
        monkeypatch.setattr(handler, "stream", sys.stderr)
    args, out = args(tmp_path) if callable(args) else args, tmp_path / "out"
    before = sorted(os.listdir(out)) if out.exists() else None
    prefix = ["--model", "tiny", "--device", "cpu", "--out-dir", str(out)]
    code, err = exits(args if "--resume" in args else [*prefix, *args], capfd)
    assert code == 2, err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert re.search(message, err), err
    for unwanted in ("Traceback", "usage:", "weights_only", "Loading weights"):
        assert unwanted not in err, f"{unwanted!r} in {err}"
    assert (sorted(os.listdir(out)) if out.exists() else None) == before

def test_offline_and_an_interrupted_start_are_one_line(tmp_path, monkeypatch, capsys):
    """hub_reachable probes; offline runs fail at once, in a line; early Ctrl-C: a line, 130."""
    hub = huggingface_hub.constants
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as server:
        threading.Thread(target=server.handle_request).start()  # one answer (an error: it will do)
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert E.hub_reachable()
    capsys.readouterr()  # the server's log of its answer
    monkeypatch.setattr(hub, "ENDPOINT", "https://hub.invalid")  # never resolves
    assert not E.hub_reachable()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    assert not E.hub_reachable()
    unreachable = "the Hugging Face hub is unreachable"
    for argv, said in [(["--loss", "e2e"], f"cannot download model 'gpt2': {unreachable}"),
                       (["--model", "tiny", "--dataset", "someone/some-corpus"],
                        f"cannot stream dataset 'someone/some-corpus': {unreachable}")]:
        code, err = exits([*argv, "--out-dir", str(tmp_path / "a"), "--device", "cpu"], capsys)
        assert code == 2, err
        assert err.count("\n") == 1, err
        assert said in err, err
        assert "--model tiny --dataset random" in err, err
    monkeypatch.setattr(E, "setup", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    said = "stopped: interrupted (any checkpoint already written is intact)\n"
    argv = ["--model", "tiny", "--device", "cpu", "--out-dir", str(tmp_path / "b")]
    assert exits(argv, capsys) == (130, said)

def check_output_folder(out: Path, loss: str, n_layers: int, layer: int, dict_ratio=2):
    assert OUTPUT_FILES <= set(os.listdir(out))
    metrics, config = read_json(out / "metrics.json"), read_json(out / "config.json")
    assert set(metrics) == METRIC_KEYS, sorted(metrics)
    after = {str(k) for k in range(layer + 1, n_layers)}
    assert set(metrics["downstream_mse"]) == after, metrics["downstream_mse"]
    assert config["loss"] == loss, config["loss"]
    assert config["layer"] == layer, config["layer"]
    assert config["dict_size"] == config["d_model"] * dict_ratio, config["dict_size"]
    log = E.read_log(out / "log.jsonl")
    assert any("train/loss" in r and r["tokens_per_s"] > 0 for r in log)  # a training line ...
    assert any("eval/kl" in r for r in log)  # ... and an evaluation
    assert set(load_file(str(out / "sae.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    return metrics, config

def test_cli_local_model_folder_and_text_dataset_then_eval_only(tmp_path, capsys):
    """Text is packed, EOS between documents, for a saved model; --eval-only writes eval.json."""
    docs = [" ".join(f"w{(i * j) % 37}" for j in range(7 + i % 5)) for i in range(30)]
    model_dir, out = tmp_path / "model", tmp_path / "run"
    tok = make_tokenizer(model_dir, docs)
    for i, d in enumerate(docs):
        write(tmp_path, f"txt/{i:02}.txt", d)
    write(tmp_path, "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert tok(docs[0])["input_ids"][0] == tok.bos_token_id
    eos = [tok.eos_token_id]
    stream = [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + eos]
    for source in ("txt", "docs.jsonl"):
        cfg = cfg_for(dataset=str(tmp_path / source), n_ctx=16)
        packed = [s.tolist() for s in E.sequences(cfg, tok, len(tok))]
        assert packed == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)], source
        assert len(packed) == len(stream) // 16, source
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                               eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    E.main(["--model", str(model_dir), "--dataset", str(tmp_path / "txt"), "--loss", "local",
            "--layer", "1", "--n-samples", "32", "--batch-size", "4", "--n-ctx", "16",
            "--eval-samples", "6", "--dict-ratio", "2", "--out-dir", str(out)])
    trained, printed = check_output_folder(out, "local", 3, 1)[0], capsys.readouterr().out
    n_train = len(packed) - 6  # the training sequences after the 6 held out
    passes = f"{32 / n_train:.1f} passes over the {n_train} training sequences of --dataset"
    assert printed.splitlines()[0] == f"--n-samples 32 makes {passes} {tmp_path / 'txt'}", printed
    assert trained["n_eval_tokens"] == 6 * 16, trained["n_eval_tokens"]
    assert "final:" in printed, printed
    saved = (out / "metrics.json").read_bytes()
    E.main(["--eval-only", "--sae", str(out)])
    printed, beside = capsys.readouterr().out, read_json(out / "eval.json")
    E.main(["--eval-only", "--sae", str(out / "sae.safetensors"), "--out-dir", str(tmp_path / "e")])
    elsewhere = read_json(tmp_path / "e" / "eval.json")
    assert f"wrote {tmp_path / 'e'}/eval.json" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == saved, (out / "metrics.json").read_text()
    assert f"kl {beside['kl']:.4g}" in printed, printed
    assert f"wrote {out}/eval.json" in printed, printed
    assert beside == elsewhere, (beside, elsewhere)
    assert set(beside) == METRIC_KEYS, sorted(beside)
    for k in METRIC_KEYS - {"downstream_mse"}:
        assert beside[k] == pytest.approx(trained[k], rel=1e-4, abs=1e-6), k
    sae_dir(tmp_path / "bare", sae=identity_sae(64))
    cfg = E.parse_config(["--eval-only", "--sae", str(tmp_path / "bare"), "--model", "tiny",
                          *"--layer 3 --n-ctx 16 --eval-samples 4 --device cpu".split()])
    m = E.evaluate_saved(cfg)
    assert cfg.out_dir == str(tmp_path / "bare"), cfg.out_dir
    assert abs(m["kl"]) < 1e-6, f"KL {m['kl']}"
    assert read_json(tmp_path / "bare" / "eval.json") == json.loads(json.dumps(m))
    write(tmp_path, "bare/config.json", '{"model": "tiny", "layer": 3}')  # before `center` was
    assert not E.parse_config(["--eval-only", "--sae", str(tmp_path / "bare")]).center

# --- Runs in subprocesses: `python e2e_sae.py` itself, a real SIGTERM, torchrun
def launch(folder: Path, *argv, torchrun=0):
    """`python e2e_sae.py` (or under torchrun) in a session of its own, on one thread, to files."""
    prefix = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    command = [sys.executable, *(prefix if torchrun else []), "e2e_sae.py", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        return subprocess.Popen(command, cwd=HERE, stdout=out, stderr=err, env=env,
                                start_new_session=True)

def sigterm_at(path: Path, proc, rank=None):
    """SIGTERM, once path exists, to proc, or to its torchrun worker of that rank (in /proc)."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.005)
    for p in Path("/proc").glob("[0-9]*") if rank is not None else []:
        with suppress(OSError, ValueError, IndexError):
            if (int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid
                    and f"RANK={rank}".encode() in (p / "environ").read_bytes().split(b"\0")):
                return os.kill(int(p.name), signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)

def finished(proc, folder: Path, timeout=300):
    """Its exit code, stdout and stderr; a stuck run (in a collective) is killed with its session"""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, (folder / "stdout").read_text(), (folder / "stderr").read_text()

# --- The output folder, checkpoints and resuming
def run_args(out: Path, data="random", *extra):
    """16 steps of 2 × 4 sequences: warm-up to step 2, evaluations after 6, 12, 16, checkpoints
    after 4, 8, 12, a log line every 2; 9 evaluation sequences (5 and 4 over two processes)."""
    return ["--model", "tiny", "--dataset", data, *(
        "--n-ctx 16 --batch-size 4 --grad-accum 2 --n-samples 128 --warmup-samples 16 "
        "--eval-samples 9 --eval-every 48 --save-every 32 --log-every 2 --dict-ratio 4 "
        "--device cpu").split(), "--out-dir", str(out), *extra]

def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)
def assert_same_run(a: Path, b: Path, tol=0.0, windows=False):
    """The same SAE, evaluations and log lines at the same steps: bitwise by default (CPU kernels
    are deterministic); training lines too where both averaged the same windows of steps."""
    sae_a, sae_b = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    for k in sae_a:
        torch.testing.assert_close(sae_a[k], sae_b[k], atol=tol, rtol=0)
    assert tol or read_json(a / "metrics.json") == read_json(b / "metrics.json")
    log_a, log_b = E.read_log(a / "log.jsonl"), E.read_log(b / "log.jsonl")
    assert [(r["step"], sorted(r)) for r in log_a] == [(r["step"], sorted(r)) for r in log_b]
    for r_a, r_b in zip(log_a, log_b):
        for k in [k for k in r_a if k.startswith("eval/") or windows and k.startswith("train/")]:
            assert r_a[k] == pytest.approx(r_b[k], rel=tol, abs=tol), (r_a["step"], k)

@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """run_args's run, left alone: what every interrupted, resumed or many-process run ends as."""
    out = tmp_path_factory.mktemp("alone") / "run"
    E.train(E.parse_config(run_args(out)))
    return out

def stopped(argv, name, n, how=signal.SIGINT):
    """The exception E.train(argv) ends with, given `how` (signal, error, function) at call n."""
    calls, real = [], getattr(E, name)
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and isinstance(how, Exception):
            raise how
        if len(calls) == n and isinstance(how, int):
            os.kill(os.getpid(), how)
        result = real(*args, **kwargs)
        return how(result) if len(calls) == n and callable(how) else result
    with patch.object(E, name, wrapper), pytest.raises(BaseException) as e:
        E.train(E.parse_config(argv))
    return e.value

def test_saved_sae_reproduces_the_module_and_is_what_saelens_reads(tmp_path):
    """sae.safetensors holds â = relu(a @ W_enc + b_enc) @ W_dec + b_dec, as load_sae rebuilds it;
    cfg.json and sae_weights.safetensors are what SAELens 6's docs say its standard SAE reads."""
    torch.manual_seed(0)
    sae = E.SAE(16, 48)
    with torch.no_grad():
        sae.decoder.weight.mul_(3.0)  # columns no longer unit norm in the raw weight
        sae.decoder.bias.normal_()
    E.save_sae(sae, tmp_path / "sae.safetensors")
    info = {"model": "tiny", "layer": 6, "n_ctx": 16, "dataset": "random", "d_model": 16,
            "dict_size": 48, "center": False}
    E.save_saelens(tmp_path, info)
    t, w = (load_file(tmp_path / name) for name in ("sae.safetensors", "sae_weights.safetensors"))
    assert {k: (tuple(v.shape), v.dtype) for k, v in w.items()} == {
        "W_enc": ((16, 48), torch.float32), "b_enc": ((48,), torch.float32),
        "W_dec": ((48, 16), torch.float32), "b_dec": ((16,), torch.float32)}
    assert all(torch.equal(t[k], w[k]) for k in t)
    norms = t["W_dec"].norm(dim=1)
    assert torch.allclose(norms, torch.ones(48), atol=1e-6), f"W_dec's row norms {norms}"
    assert (tmp_path / "sae_weights.safetensors").samefile(tmp_path / "sae.safetensors")  # a link
    cfg = read_json(tmp_path / "cfg.json")
    standard = {"architecture": "standard", "d_in": 16, "d_sae": 48, "dtype": "float32",
                "apply_b_dec_to_input": False, "device": "cpu", "normalize_activations": "none",
                "reshape_activations": "none"}
    meta = {"hook_name": "blocks.6.hook_resid_pre", "model_name": "tiny", "context_size": 16,
            "prepend_bos": False, "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    assert {k: cfg[k] for k in standard} == standard
    assert {k: cfg["metadata"][k] for k in meta} == meta  # uncentred: HF's residual stream
    version = cfg["metadata"]["sae_lens_version"]
    assert int(version.split(".")[0]) >= 6, f"sae_lens_version {version}"
    E.save_saelens(tmp_path, {**info, "center": True})  # TransformerLens's centred hook_resid_pre
    kwargs = read_json(tmp_path / "cfg.json")["metadata"]["model_from_pretrained_kwargs"]
    assert kwargs == {"center_writing_weights": True}
    assert E.read_saelens(tmp_path)[1]["center"] is True
    a = torch.randn(3, 5, 16)
    with torch.no_grad():
        (a_hat, c), (loaded, config) = sae(a), E.load_sae(tmp_path)
        a_in = a - w["b_dec"] * cfg["apply_b_dec_to_input"]
        saelens = F.relu(a_in @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
        assert torch.allclose(saelens, a_hat, atol=1e-5), f"off by {(saelens - a_hat).abs().max()}"
        assert config is None
        assert torch.allclose(loaded(a)[0], a_hat, atol=1e-5), "load_sae's â"
        assert torch.allclose(loaded(a)[1], c, atol=1e-6), "load_sae's c"

@pytest.mark.parametrize("n, who", [(0, "SIGTERM"), (2, "a signal to a process")],
                         ids=["python", "torchrun-2"])
def test_sigterm_checkpoints_and_resume_ends_as_the_run_left_alone(tmp_path, alone, n, who):
    """A real SIGTERM, once the checkpoint of step 4 exists, to `python e2e_sae.py` or to rank 1
    of 2 alone: the step finishes, and the flag, riding on its reduction, stops every process
    after it; rank 0 writes a checkpoint and says once how to resume. Resumed here, it ends as the
    run left alone: bitwise, or up to rounding after two processes. Data: random tokens, streamed"""
    out, rank = tmp_path / "run", 1 if n else None
    sigterm_at(out / "checkpoint.pt", proc := launch(tmp_path, *run_args(out), torchrun=n), rank)
    rc, _, stderr = finished(proc, tmp_path)
    said = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    step = checkpoint(out)["step"]
    assert len(said) == 1, stderr[-3000:]
    assert rc != 0 if n else rc == 128 + signal.SIGTERM, stderr[-3000:]
    assert n or "Traceback" not in stderr, stderr[-3000:]
    assert n or stderr.strip().splitlines()[-1] == said[0], stderr[-3000:]  # said last
    assert said[0] == (f"stopped: {who} after step {step} of 16: checkpoint written to {out}; "
                       f"continue with: python e2e_sae.py --resume {out}")
    assert 4 < step < 16, step
    assert not (out / "sae.safetensors").exists()
    E.train(E.parse_config(["--resume", str(out)]))
    assert read_json(out / "config.json")["n_processes"] == 1
    assert check_output_folder(out, "e2e", 12, 6, dict_ratio=4)[0]["n_eval_tokens"] == 9 * 16
    assert_same_run(alone, out, tol=1e-5 if n else 0)

def plant_nan(out):  # NaN into the KL term and the loss of compute_loss's result
    loss, terms, c = out
    return loss + terms["kl"] * float("nan"), {**terms, "kl": terms["kl"] * float("nan")}, c

@pytest.mark.parametrize("data, stops, step", [
    # SIGINT in step 9: the step finishes, its reduction carries the flag, the run stops after it
    # with a checkpoint (a jsonl source is held in memory, reshuffled every epoch: 1.28 of them)
    ("random", [("train_step", 9, signal.SIGINT, "Interrupted.*SIGINT after step 9 of 16")], 9),
    ("jsonl", [("train_step", 9, signal.SIGINT, "Interrupted.*SIGINT after step 9 of 16")], 9),
    # stopped after step 6, an evaluation point: the checkpoint says it is due; resuming does it
    ("random", [("train_step", 6, signal.SIGINT, "Interrupted.*after step 6 of 16")], 6),
    # SIGTERM during a periodic evaluation acts after the next step; Ctrl-C during the final one
    # (the resumed run's second), outside the loop, acts as usual, after the last checkpoint
    ("random", [("evaluate", 1, signal.SIGTERM, "Interrupted.*SIGTERM after step 7 of 16"),
                ("evaluate", 2, signal.SIGINT, "KeyboardInterrupt")], 16),
    # a hard kill, where no handler runs: back to step 12's checkpoint, later log lines rewritten
    ("random", [("train_step", 15, RuntimeError("killed"), "RuntimeError killed")], 12),
    # a NaN in step 11's first micro-batch, read at step 12's log line, before its evaluation and
    # checkpoint: step 8's is intact
    ("random", [("compute_loss", 2 * 11 - 1, plant_nan,
                 "UserError the loss or its gradient is not finite \\(loss nan, kl nan, sparsity "
                 ".*; nothing after step 8 was written, so any checkpoint in --out-dir is "
                 "intact, but resuming would repeat the same steps: start again with a lower "
                 "--lr \\(and --overwrite\\)")], 8),
], ids=["signal", "signal-jsonl", "before-an-evaluation", "during-evaluations", "hard-kill", "nan"])
def test_a_stopped_run_resumes_to_the_run_left_alone(tmp_path, alone, data, stops, step):
    """Each checkpoint left is re-saved as a GPU run writes it (its tensors on cuda:0; the CPU build
    writes such a file when told that location) and resumed with --device cpu."""
    if data == "jsonl":
        g = torch.Generator().manual_seed(3)
        data = write_sources(tmp_path, torch.randint(512, (109, 16), generator=g).tolist())[1]
        E.train(E.parse_config(run_args(alone := tmp_path / "alone", data)))
    out = tmp_path / "stopped"
    for i, (name, n, how, said) in enumerate(stops):
        e = stopped(["--resume", str(out)] if i else run_args(out, data), name, n, how)
        assert re.search(said, f"{type(e).__name__} {e}"), repr(e)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    log = E.read_log(out / "log.jsonl")
    assert checkpoint(out)["step"] == step, checkpoint(out)["step"]
    assert checkpoint(out)["eval_due"] == (step == 6), checkpoint(out)["eval_due"]
    assert not (out / "sae.safetensors").exists()
    assert step != 6 or not any("eval/kl" in r for r in log)  # the evaluation is still due
    assert step != 12 or max(r["step"] for r in log) == 14  # lines past the checkpoint, to go
    with patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(checkpoint(out), out / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location meets
        checkpoint(out)
    E.train(E.parse_config(["--resume", str(out), "--save-every", "16", "--device", "cpu"]))
    assert_same_run(alone, out)
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps only its SAE

def test_resume_keeps_the_run_and_only_overwrite_replaces_it(tmp_path, monkeypatch, capsys):
    """Stopped after step 5 of 16 (bf16): contradicting flags, a shorter --n-samples than done, a
    checkpoint that does not fit are refused and lose nothing; --n-samples 192 says first where it
    resumes, counts from there with an ETA, ends at step 24 on the schedule of 24 steps. Finished,
    only --overwrite replaces it; log lines carry tokens/s, and MFU where the peak is known."""
    out = tmp_path / "run"
    e = stopped(run_args(out, "random", "--dtype", "bf16"), "train_step", 5)
    assert isinstance(e, E.Interrupted), repr(e)
    saved, _ = (out / "checkpoint.pt").read_bytes(), capsys.readouterr()
    ways = f"--overwrite to replace it, --resume {out} to continue it, or another --out-dir"
    with pytest.raises(E.UserError, match=f"holds an unfinished run .*: pass {re.escape(ways)}$"):
        E.train(E.parse_config(run_args(out)))
    only = ("; only --n-samples, --eval-every, --log-every, --save-every, --device, --dtype and "
            "--compile may change when resuming")
    for flags, message in [
            ("--layer 5", re.escape(f"--layer 5 contradicts the run in {out} (--layer 6){only}")),
            ("--model gpt2", "--model gpt2 contradicts the run in .* \\(--model tiny\\)"),
            ("--dict-ratio 8", "--dict-ratio 8.0 contradicts the run in .* \\(--dict-ratio 4.0\\)"),
            ("--loss local", "--loss local contradicts"),
            (f"--out-dir {tmp_path / 'elsewhere'}", "--out-dir .*elsewhere contradicts"),
            ("--overwrite", "--overwrite True contradicts")]:
        with pytest.raises(E.UserError, match=message):
            E.parse_config(["--resume", str(out), *flags.split()])
    own = f"{out}/"  # its own folder, layer, model may be repeated; its device and dtype are kept
    cfg = E.parse_config(["--resume", own, "--layer", "6", "--model", "tiny", "--out-dir", own])
    assert (cfg.device, cfg.dtype, cfg.out_dir, cfg.layer) == ("cpu", "bf16", str(out), 6)
    cfg = E.parse_config(["--resume", str(out), "--eval-every", "32", "--log-every", "1",
                          "--dtype", "fp32"])
    assert (cfg.eval_every, cfg.log_every, cfg.dtype) == (32, 1, "fp32")
    assert E.Config(resume=str(out), model="tiny").out_dir == str(out)  # in Python too
    code, err = exits(["--resume", str(out), "--n-samples", "32"], capsys)
    assert code == 2, code
    assert err == "error: --n-samples 32 is less than the 40 sequences trained on\n", err
    assert (out / "checkpoint.pt").read_bytes() == saved, "the checkpoint changed"
    state = checkpoint(out)  # a checkpoint whose SAE does not fit the model (width 32, not 64)
    state["sae"]["encoder.weight"] = torch.zeros(256, 32)
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(E.UserError, match="checkpoint.pt is not a valid checkpoint for this run"):
        E.train(E.parse_config(["--resume", str(out)]))
    write(out, "checkpoint.pt", saved)
    E.main(["--resume", str(out), "--n-samples", "192"])
    printed, log = capsys.readouterr(), E.read_log(out / "log.jsonl")
    lr_at_16 = next(r["train/lr"] for r in log if r["step"] == 16 and "train/lr" in r)
    assert printed.out.splitlines()[0] == (f"resuming the run in {out} at step 5 of 24, on the "
                                           "learning-rate schedule of --n-samples 192"), printed.out
    assert "| 5/24 [" in printed.err, printed.err[-500:]
    assert re.search(r"\| (6|7|8|9|1\d|2[0-3])/24 \[\d\d:\d\d<\d\d:\d\d", printed.err), printed.err
    assert "passes" not in printed.out, printed.out  # random tokens: no passes over a dataset
    assert max(r["step"] for r in log) == 24, [r["step"] for r in log]  # the run's new length
    assert read_json(out / "config.json")["n_samples"] == 192
    assert lr_at_16 == pytest.approx(5e-4 * E.lr_factor(15, 2, 24, 0.1)), lr_at_16  # warm-up 2
    args = run_args(out, "random", "--n-samples", "32", "--log-every", "2")
    old_sae = (out / "sae.safetensors").read_bytes()
    with pytest.raises(E.UserError, match="already holds a finished run .*: pass --overwrite to"):
        E.train(E.parse_config(args))
    assert (out / "sae.safetensors").read_bytes() == old_sae
    monkeypatch.chdir(out)  # the working folder: a fine --out-dir, no --init-from
    assert E.check_out_dir(E.parse_config(["--out-dir", ".", "--overwrite"])) is None
    monkeypatch.chdir(HERE)
    E.train(E.parse_config(["--resume", str(out)]))  # nothing to resume
    assert "holds a finished run: nothing to resume" in capsys.readouterr().out
    E.main(["--compare", str(out), str(out), "--device", "cpu"])  # of the SAE about to be replaced
    monkeypatch.setattr(E, "peak_flops", lambda device, dtype: 1e12)  # a peak, pretended
    E.train(E.parse_config([*args, "--overwrite", "--seed", "1"]))
    train_lines = [r for r in E.read_log(out / "log.jsonl") if "tokens_per_s" in r]
    model = E.tiny_gpt2()
    flops = E.flops_per_token(model, E.decoder_blocks(model), E.SAE(64, 256), "e2e", 6, 16)
    assert [r["step"] for r in train_lines] == [2, 4]  # 4 steps, a line every 2
    for r in train_lines:
        assert r["tokens_per_s"] > 0, r
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e12), r
    assert (out / "sae.safetensors").read_bytes() != old_sae
    assert not (out / "compare.json").exists()
    # SAELens's weights are the new SAE's (a fresh hard link); files are readable as open() makes
    assert (out / "sae_weights.safetensors").samefile(out / "sae.safetensors")
    umask = os.umask(0o22)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(OUTPUT_FILES, 0o666 & ~umask), modes

def test_a_killed_or_failed_checkpoint_write_keeps_the_last_one(tmp_path, monkeypatch):
    """SIGKILL a fork writing checkpoints in a loop: the file left loads, as a completed step's. A
    kill mid-write, or an error: the old checkpoint stays (with the RNG), no temporary file."""
    run = new_run(64, 8192)
    run.sae(torch.randn(2, 64))[0].sum().backward()
    run.optimizer.step()
    read_end, write_end = os.pipe()
    if (pid := os.fork()) == 0:  # the child, which never returns into pytest
        try:
            for step in itertools.count(1):
                run.sae.encoder.bias.data.fill_(step)
                E.save_checkpoint(tmp_path, run, step, 0.0)
                os.write(write_end, f"{step}\n".encode())
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as progress:
        done = [int(progress.readline()) for _ in range(3)]  # three complete checkpoints ...
        time.sleep(0.37)  # ... then a kill in the middle of whatever comes next
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    step = E.load_checkpoint(tmp_path, fresh := new_run(64, 8192))["step"]
    assert step >= done[-1], f"step {step}, after {done}"
    assert torch.all(fresh.sae.encoder.bias == step), "the SAE is not that step's"
    (folder := tmp_path / "failed").mkdir()
    run, _ = new_run(8, 16), torch.manual_seed(5)
    E.save_checkpoint(folder, run, 1, 0.0)
    before, drawn = (folder / "checkpoint.pt").read_bytes(), torch.rand(3)  # the RNG is saved
    half_written = lambda fd: (os.ftruncate(fd, os.fstat(fd).st_size // 2)
                               or (_ for _ in ()).throw(KeyboardInterrupt))
    for where, name, fake in [(E.os, "fsync", half_written), (E.torch, "save", lambda *a: 1 / 0)]:
        with monkeypatch.context() as m, pytest.raises((KeyboardInterrupt, ZeroDivisionError)):
            m.setattr(where, name, fake)  # where a kill would strike, or an error in serialising
            E.save_checkpoint(folder, run, 2, 0.0)
        assert (folder / "checkpoint.pt").read_bytes() == before, name
        assert os.listdir(folder) == ["checkpoint.pt"], os.listdir(folder)
    assert E.load_checkpoint(folder, run)["step"] == 1
    assert torch.equal(torch.rand(3), drawn), "the RNG is not the checkpoint's"

# --- Other tools' SAEs: read exactly, evaluated, fine-tuned
def saelens_dir(folder, d_in=64, layer=3, flat=False, scale=None, kwargs=None, weights=True, **cfg):
    """A SAELens standard SAE (32 elements, decoder rows of norms 0.5–3, b_dec applied to the input,
    a scale in activation_scaler.json), in SAELens 6's layout or the older flat one; cfg: edits"""
    g = torch.Generator().manual_seed(layer)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    t = {"W_enc": 0.3 * randn(d_in, 32), "b_enc": 0.3 * randn(32),
         "W_dec": F.normalize(randn(32, d_in), dim=1) * (0.5 + 2.5 * torch.rand(32, 1, generator=g)),
         "b_dec": randn(d_in)}
    meta = {"hook_name": f"blocks.{layer}.hook_resid_pre", "model_name": "tiny",
            "model_from_pretrained_kwargs": kwargs}
    run = {"d_in": d_in, "d_sae": 32, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "expected_average_only_in" if scale else "none"}
    weights and save_file(t, write(folder, "sae_weights.safetensors", b""))  # or none at all
    v6 = {**run, "architecture": "standard", "metadata": {**meta, "sae_lens_version": "6.5.0"}}
    write(folder, "cfg.json", json.dumps({**run, **meta, **cfg} if flat else {**v6, **cfg}))
    scale and write(folder, "activation_scaler.json", json.dumps({"scaling_factor": scale}))
    def by_hand(a, s=scale or 1.0):  # SAELens's standard SAE: (s·a − b_dec) in, ÷ s out
        f = torch.relu((s * a - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        return (f @ t["W_dec"] + t["b_dec"]) / s, f
    return str(folder), by_hand

def paper_checkpoint(path: Path, keys=("encoder.0.weight", "encoder.0.bias", "decoder.weight",
                                       "decoder.bias")):
    """A .pt of the paper's library: an SAE of blocks.3.hook_resid_pre, its decoder not unit-norm"""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    w = {"encoder.0.weight": 0.3 * randn(32, 64), "encoder.0.bias": 0.3 * randn(32),
         "decoder.weight": 2 * randn(64, 32), "decoder.bias": randn(64)}
    keyed = {f"blocks-3-hook_resid_pre.{k}": w.get(k, torch.ones(1)) for k in keys}
    torch.save(keyed, write(path.parent, path.name, b""))
    def by_hand(a):  # the library's SAE: c = ReLU(W_e a + b_e), â = D_n c + b_d, D_n unit columns
        c = torch.relu(a @ w["encoder.0.weight"].T + w["encoder.0.bias"])
        return c @ F.normalize(w["decoder.weight"], dim=0).T + w["decoder.bias"], c
    return str(path), by_hand

@pytest.mark.parametrize("kind", ["saelens-6", "saelens-flat", "saelens-scaled", "paper"])
def test_saes_of_other_tools_are_read_exactly_and_evaluated_where_they_say(tmp_path, tiny, kind):
    """A SAELens SAE (b_dec subtracted from the input, rows of norms 0.5–3, an input scale) or the
    paper's library's, folded: its formula's â by hand, the same elements firing; its files give
    model, layer 3 and centred basis, and --eval-only on them is evaluate() of the folded SAE."""
    scale = 0.37 * (kind == "saelens-scaled")
    path, by_hand = (paper_checkpoint(tmp_path / "p" / "samples_400000.pt") if kind == "paper" else
                     saelens_dir(tmp_path / "s", flat=kind == "saelens-flat", scale=scale))
    a = 3 * torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (a_hat, c), (expected, f) = E.load_sae(path)[0](a), by_hand(a)
    assert torch.allclose(a_hat, expected, atol=1e-5), f"off by {(a_hat - expected).abs().max()}"
    assert torch.equal(c > 0, f > 0), "other elements fire"
    assert 0 < (f > 0).sum() < f.numel(), f"{(f > 0).sum()} of {f.numel()} fire"
    args = ev(path, *"--model tiny --n-ctx 16 --eval-samples 4 --device cpu".split())
    cfg = E.parse_config(args[:3] if kind != "paper" else args[:5])
    assert (cfg.model, cfg.layer, cfg.center) == ("tiny", 3, True)
    E.main(args)
    E.main(["--compare", path, path])  # compare.json too goes beside the SAE, in a .pt's folder
    here = Path(path).parent if kind == "paper" else Path(path)
    metrics = read_json(here / "eval.json")
    assert read_json(here / "compare.json")["cross"]["min"] == pytest.approx(1.0)
    cfg = E.parse_config(args)
    m = E.evaluate(*tiny, E.load_sae(path)[0], E.load_data(cfg, None, 512)[0], 3, cfg.batch_size)
    expected = json.loads(json.dumps(m))
    assert metrics.pop("downstream_mse") == pytest.approx(expected.pop("downstream_mse"), rel=1e-6)
    assert metrics == pytest.approx(expected, rel=1e-6)

def test_init_from_starts_from_the_saved_sae_and_says_so(tmp_path, monkeypatch):
    """--init-from: model, layer and basis come from the SAE's files; the first step starts from its
    weights; config.json says where the run started. TransformerLens's gpt2-small is HF's gpt2, and
    a SAELens SAE of a model loaded without centring reads the raw stream."""
    folder, _ = saelens_dir(tmp_path / "s")
    start, steps, train_step = E.load_sae(folder)[0].state_dict(), [], E.train_step
    monkeypatch.setattr(E, "train_step", lambda cfg, run, *a: steps.append(
        {k: v.clone() for k, v in run.sae.state_dict().items()}) or train_step(cfg, run, *a))
    E.main(["--init-from", folder, "--mse-coeff", "0.5", "--n-samples", "32", "--batch-size", "4",
            "--grad-accum", "1", "--n-ctx", "16", "--eval-samples", "4", "--device", "cpu",
            "--out-dir", str(tmp_path / "run")])
    assert len(steps) == 8, len(steps)
    assert all(torch.equal(steps[0][k], v) for k, v in start.items())
    assert not torch.equal(steps[-1]["encoder.weight"], start["encoder.weight"])
    config = read_json(tmp_path / "run" / "config.json")
    assert (config["init_from"], config["model"], config["layer"], config["center"],
            config["dict_size"]) == (folder, "tiny", 3, True, 32)
    assert (config["loss"], config["mse_coeff"], config["sparsity_coeff"]) == ("e2e", 0.5, 0.7825)
    assert config["dict_ratio"] == 0.5, config["dict_ratio"]
    resumed = E.setup(E.parse_config(["--resume", str(tmp_path / "run")]))
    assert resumed.sae.encoder.out_features == 32, resumed.sae.encoder.out_features
    # SAELens loads models uncentred unless told, except before 3.19.2 (no kwargs saved): centred
    for kwargs, centred in [({"center_writing_weights": True}, True), ({}, False),
                            ({"dtype": "float32"}, False)]:
        for flat in (False, True):
            name = f"{len(kwargs)}{kwargs.get('dtype')}{flat}"
            path = saelens_dir(tmp_path / name, kwargs=kwargs, flat=flat)[0]
            assert E.parse_config(["--init-from", path]).center is centred, (kwargs, flat)
    old = saelens_dir(tmp_path / "old", flat=True)[0]  # before 3.0: hook_point, not hook_name
    cfg = read_json(Path(old, "cfg.json"))
    cfg = {k: v for k, v in cfg.items() if k not in ("hook_name", "model_from_pretrained_kwargs")}
    write(Path(old), "cfg.json", json.dumps({**cfg, "hook_point": "blocks.5.hook_resid_pre"}))
    assert E.parse_config(["--init-from", old]).layer == 5
    assert E.parse_config(["--init-from", old]).center is True

# --- Many processes: real torchrun launches (gloo on the CPU, on loopback), and simulated ranks
@pytest.fixture(scope="module", autouse=True)
def two_processes(request, tmp_path_factory):
    """torchrun's run of 2 processes, started at once (imports take seconds), if its test runs."""
    folder = tmp_path_factory.mktemp("two")
    selected = any(i.originalname.startswith("test_two_processes") for i in request.session.items)
    proc = selected and launch(folder, *run_args(folder / "run"), torchrun=2)
    yield proc, folder
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)

def test_two_processes_train_the_sae_of_one_and_pool_its_evaluation(two_processes, alone, tiny):
    """Under torchrun, 2 processes of micro-batch 2 train the SAE of one of 4, up to rounding; rank
    0 alone prints and writes; the pooled evaluation is one process's (a mean of means: 1e-3 off)"""
    (rc, stdout, stderr), out = finished(*two_processes), two_processes[1] / "run"
    assert rc == 0, stderr[-3000:]
    assert stdout.count("e2e SAE at layer 6") == 1, stdout
    assert "2 processes of 2 sequences per micro-batch" in stdout, stdout
    assert stdout.count("wrote ") == 1, stdout
    assert set(os.listdir(out)) == OUTPUT_FILES, os.listdir(out)
    assert read_json(out / "config.json")["n_processes"] == 2
    assert_same_run(alone, out, tol=1e-5, windows=True)
    cfg, pooled = E.parse_config(run_args(out)), read_json(out / "metrics.json")
    one = E.evaluate(*tiny, E.load_sae(out)[0], E.load_data(cfg, None, 512)[0], cfg.layer, 9)
    assert one["n_eval_tokens"] == 9 * 16, one["n_eval_tokens"]
    assert pooled["n_eval_tokens"] == 9 * 16, pooled["n_eval_tokens"]
    assert pooled["alive_dict_elements"] == one["alive_dict_elements"]  # counts, pooled exactly
    assert pooled["l0"] == pytest.approx(one["l0"], abs=1e-12)
    for k in METRIC_KEYS - {"downstream_mse", "n_eval_tokens", "alive_dict_elements", "l0"}:
        assert pooled[k] == pytest.approx(one[k], rel=1e-6, abs=2e-6), k  # fp32 sums, in fp64
    one_ds = {str(k): v for k, v in one["downstream_mse"].items()}
    assert pooled["downstream_mse"] == pytest.approx(one_ds, rel=1e-6)

@pytest.mark.parametrize("n", [2, 3, 7])
def test_sharded_evaluation_equals_one_process_for_any_number_of_processes(tiny, monkeypatch, n):
    """n simulated processes (with 7, some of the 5 sequences' shares are empty) each evaluate a
    share; the sums all_reduce adds up give one process's metrics. evaluate() reads no process
    state: torchrun's RANK=0, WORLD_SIZE=n without a process group give the plain result. Logits
    read in chunks of 7 positions (ragged: 7 does not divide 2 · 12) give what one chunk gives, and
    no (B·T, V) tensor is made."""
    torch.manual_seed(0)
    sae, tokens, sums, sizes = E.SAE(64, 128), tokens_for(tiny[0], B=5, T=12), [], []
    evaluate = partial(E.evaluate, *tiny, sae, layer=4, batch_size=2)
    one = evaluate(tokens)
    with patch.multiple(E, TORCHRUN=True, RANK=0, WORLD_SIZE=n):
        under_torchrun = evaluate(tokens)
    assert under_torchrun == one, (under_torchrun, one)
    class Collected(Exception):
        pass
    def collect(process_sums):  # first pass: every process's own sums, then stop
        sums.append([t.clone() for t in process_sums])
        raise Collected
    def add_up(process_sums):  # what the collective gives every process: the sums of all
        for i, t in enumerate(process_sums):
            t.copy_(sum(s[i] for s in sums))
    for share in tokens.tensor_split(n):
        with pytest.raises(Collected):
            evaluate(share, all_reduce=collect)
    pooled = evaluate(tokens.tensor_split(n)[-1], all_reduce=add_up)
    assert pooled["n_eval_tokens"] == 5 * 12, pooled["n_eval_tokens"]
    for k in METRIC_KEYS - {"downstream_mse"}:  # fp32 sums per batch, pooled in float64
        assert pooled[k] == pytest.approx(one[k], rel=1e-6, abs=2e-6), k
    assert pooled["downstream_mse"] == pytest.approx(one["downstream_mse"], rel=1e-6)
    def seven_rows(head, hs, chunk_rows=None, chunks=E.log_softmax_chunks):
        for rows, log_ps in chunks(head, hs, 7):
            sizes.append(log_ps[0].shape)
            yield rows, log_ps
    monkeypatch.setattr(E, "log_softmax_chunks", seven_rows)
    chunked = evaluate(tokens)
    assert max(rows for rows, _ in sizes) == 7, sizes
    assert chunked.pop("downstream_mse") == one.pop("downstream_mse")
    assert chunked == pytest.approx(one, rel=1e-6, abs=2e-6)  # fp32 sums per chunk

def test_under_torchrun_rank_0_says_flag_errors_each_rank_later_ones(tmp_path, monkeypatch, capsys):
    """As rank 1 of 2: flag mistakes are rank 0's to say, later errors each rank's; batches split"""
    monkeypatch.chdir(tmp_path)
    for name, value in dict(TORCHRUN=True, RANK=1, WORLD_SIZE=2, MAIN_PROCESS=False).items():
        monkeypatch.setattr(E, name, value)
    monkeypatch.setattr(E.dist, "init_process_group", lambda *args, **kwargs: None)
    cases = {"--loss l2": "", "--layer 12": "--layer 12 is outside the model's blocks 0 … 11",
             "--batch-size 7": "--batch-size 7 does not split evenly over 2 processes",
             "--compare a b": "--inspect and --compare run in one process: start them with "
                              "python, not torchrun"}
    for argv, said in cases.items():
        expected = (2, said and f"error (rank 1): {said}\n")
        assert exits(["--model", "tiny", "--device", "cpu", *argv.split()], capsys) == expected
    monkeypatch.setattr(E, "WORLD_SIZE", 3)
    assert E.setup(cfg_for("e2e", 6, batch_size=6)).batch_size == 2

def test_under_torchrun_nccl_is_told_the_process_gpu(monkeypatch):
    """As a torchrun process on GPU 3: that GPU becomes current and init_process_group gets it as
    device_id (NCCL's barriers warn without it); the CPU build stands in for CUDA here."""
    monkeypatch.setattr(E, "TORCHRUN", True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: None)  # as if cuda:3 existed
    calls, gpu = [], torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    monkeypatch.setattr(E.dist, "init_process_group", lambda *args, **kw: calls.append((args, kw)))
    assert E.process_device(cfg_for(device="cuda")) == gpu
    assert calls == [gpu, (("nccl",), {"device_id": gpu})], calls

# --- Measuring speed
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's compiler
@pytest.mark.parametrize("loss", ["local", "e2e", "e2e_ds"])
def test_compiled_step_matches_eager(monkeypatch, loss):
    """--compile: compiled blocks and SAE, hooked, give the eager loss and gradient (dynamo and
    AOTAutograd, not inductor's C++; 2 blocks); a step and evaluations (recording every block's
    input) run without graph breaks; an evaluation's smaller last batch compiles no new graph."""
    graphs, aot_eager = [], torch._dynamo.lookup_backend("aot_eager")
    backend = lambda g, x: graphs.append(g) or aot_eager(g, x)
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=backend))
    monkeypatch.setitem(E.RANDOM_MODELS, "tiny", two_blocks(n_embd=64, n_head=4, vocab_size=512))
    torch._dynamo.reset()
    breaks = torch._dynamo.utils.counters["graph_break"]
    breaks.clear()
    cfg, tokens, results = cfg_for(loss, 0, dict_ratio=4), torch.randint(512, (4, 16)), []
    for compile in (False, True):
        run = E.setup(dataclasses.replace(cfg, compile=compile))  # a fresh model, the same SAE
        total = E.compute_loss(cfg, run.model, run.blocks, run.sae, tokens)[0]
        total.backward()
        results.append((total.item(), run.sae.encoder.weight.grad.clone()))
    compiled_parts = 1 if loss == "local" else 2  # local runs no block before layer 0
    assert len(graphs) >= compiled_parts, f"{len(graphs)} graphs: not the SAE's and the blocks'"
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert compiled == pytest.approx(eager, rel=1e-5), f"loss {compiled}, eager {eager}"
    assert torch.allclose(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5), "the gradient"
    assert all(len(b._forward_pre_hooks) == 0 for b in run.blocks), "a hook was left behind"
    evaluate = partial(E.evaluate, run.model, run.blocks, run.sae, layer=0, batch_size=4)
    evaluate(torch.randint(512, (4, 16)))  # compiles what the evaluation runs without gradients
    n_graphs = len(graphs)
    evaluate(torch.randint(512, (7, 16)))  # batches of 4 and 3
    assert not breaks, f"graph breaks: {dict(breaks)}"
    assert len(graphs) == n_graphs, f"{len(graphs) - n_graphs} graphs compiled for the last batch"

def test_benchmark_on_cpu_writes_nothing_and_knows_each_gpus_peak(tmp_path, monkeypatch, capsys):
    """MFU's peak, dense bf16 TFLOP/s from the vendors' data sheets, for each GPU as torch names it:
    the GB200 is no B200, the H100 NVL no H100, the H800 PCIe no H800. --benchmark runs on the CPU
    (GPT-2 small's blocks, with a dictionary of 4 × 768, not 60 × 768: seconds, not ten)."""
    sheets = {"H100 80GB HBM3": 989, "H100 PCIe": 756, "H100 NVL": 835, "H800": 989,
              "H800 PCIe": 756, "GH200 480GB": 989, "H200": 989, "H200 NVL": 835, "B200": 2250,
              "GB200": 2500, "A100-SXM4-80GB": 312, "A800 80GB PCIe": 312, "L40S": 362,
              "L40": 181, "L4": 121, "RTX 6000": None}  # as torch names them, after "NVIDIA "
    for name, tflops in sheets.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"NVIDIA {name}")
        peak = E.peak_flops(torch.device("cuda"), "bf16")
        assert peak == (tflops and tflops * 1e12), f"{name}: {peak}"
        assert E.peak_flops(torch.device("cuda"), "fp32") is None, f"{name}: fp32 has no bf16 peak"
    assert E.peak_flops(torch.device("cpu"), "bf16") is None, "a CPU has none"
    monkeypatch.chdir(tmp_path)
    E.main(["--benchmark", "--device", "cpu", "--bench-warmup", "0", "--bench-steps", "1",
            "--dict-ratio", "4", "--n-ctx", "32"])
    out = capsys.readouterr().out
    for said in ("gpt2-random (D=768, F=3072)", "MFU: n/a", "peak GPU memory: n/a"):
        assert said in out, f"{said!r} not in {out}"
    for loss in ("local", "e2e_ds"):
        r = E.benchmark(E.parse_config(["--benchmark", "--device", "cpu", "--model", "tiny",
                                        "--loss", loss]))
        assert set(r) == {"tokens_per_s", "step_s", "flops_per_token", "tflops_per_s",
                          "peak_memory_gib", "peak_reserved_gib", "mfu"}
        assert r["tokens_per_s"] > 0, r
        assert r["mfu"] is None, r
        assert r["peak_memory_gib"] is None, r
        tflops = r["tokens_per_s"] * r["flops_per_token"] / 1e12
        assert r["tflops_per_s"] == pytest.approx(tflops), r
        assert r["step_s"] == pytest.approx(128 / r["tokens_per_s"]), r  # 1 × 128 tokens a step
    assert f"tokens/s {r['tokens_per_s']:,.0f}" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []
# --- Looking inside: --inspect, --compare
def test_inspect_finds_a_planted_feature(tmp_path, capsys):
    """Token 123's embedding moved to 10 along axis 0 (all else stays within ±1.5 there), and an
    SAE at layer 0 with c_0 = relu(a_0 − 5): element 0 fires on that token alone, 1-7 never."""
    token, model, sae = 123, E.tiny_gpt2(), E.SAE(64, 8)
    wte, wpe = model.transformer.wte.weight.data, model.transformer.wpe.weight.data
    wte[token], sae.encoder.weight.data[:], sae.encoder.bias.data[:] = 0.0, 0.0, -1.0
    wte[token, 0], sae.encoder.weight.data[0, 0], sae.encoder.bias.data[0] = 10.0, 1.0, -5.0
    assert wte[:, 0].abs().topk(2).values[1] + wpe[:, 0].abs().max() < 1.5
    model.save_pretrained(tmp_path / "model")
    argv = ["--inspect", "--sae", sae_dir(tmp_path / "sae", sae=sae), *f"--model {tmp_path}/model "
            "--layer 0 --n-ctx 32 --inspect-samples 64 --device cpu".split()]
    E.main([*argv, "--dataset", "random", "--batch-size", "5", "--features", "0,1"])
    printed, result = capsys.readouterr().out, read_json(tmp_path / "sae" / "inspect.json")
    tokens = E.load_data(cfg_for(n_ctx=32, eval_samples=64), None, 512)[0]
    n_hits, seqs_with_token = int((tokens == token).sum()), int((tokens == token).any(1).sum())
    assert n_hits >= 2, n_hits
    assert result["n_tokens"] == 64 * 32, result["n_tokens"]
    assert result["n_sequences"] == 64, result["n_sequences"]
    planted, silent = result["features"]
    assert planted["frequency"] == n_hits / (64 * 32)  # exact
    assert len(planted["contexts"]) == min(E.TOP_CONTEXTS, seqs_with_token)
    for ctx in planted["contexts"]:  # CONTEXT_TOKENS (8) a side, fewer at edges; ids: no tokenizer
        s, t = ctx["sequence"], ctx["position"]
        assert tokens[s, t] == token, ctx
        assert ctx["activation"] == pytest.approx(5.0, abs=1.5), ctx
        assert ctx["tokens"] == tokens[s, max(0, t - 8):t + 9].tolist(), ctx
        assert ctx["marked"] == min(t, 8), ctx
        marked = (f" «{i}»" if j == ctx["marked"] else f" {i}" for j, i in enumerate(ctx["tokens"]))
        assert ctx["text"] == "".join(marked), ctx  # the maximum «marked»
    assert f"«{token}»" in printed, printed
    assert silent["frequency"] == 0, silent
    assert silent["contexts"] == [], silent
    d = result["density"]  # one element fired (in the bin of its frequency), seven are dead
    assert d["dead"] == 7, d
    assert sum(d["counts"]) == 1, d
    assert "7 dead" in printed, printed
    bins = itertools.pairwise(d["log10_freq_edges"])
    bin_ = next(i for i, (lo, hi) in enumerate(bins) if lo <= math.log10(planted["frequency"]) < hi)
    assert d["counts"][bin_] == 1, d
    # More sequences asked for than a dataset holds: what there is, and a note.
    E.main([*argv, "--dataset", write_sources(tmp_path, tokens[:5].tolist())[0], "--features", "0"])
    assert read_json(tmp_path / "sae" / "inspect.json")["n_sequences"] == 5
    said = "over the first 5 sequences (160 tokens); the dataset has no more than 5"
    assert said in capsys.readouterr().out

def test_the_running_top_k_equals_a_brute_force_top_k(tmp_path, tiny):
    """Each element's top contexts, batch by batch, against sorting all maxima at once."""
    torch.manual_seed(1)
    sae = E.load_sae(sae_dir(tmp_path / "sae", 64, 16))[0].requires_grad_(False)
    E.main(["--inspect", "--sae", str(tmp_path / "sae"), *"--model tiny --layer 3 --n-ctx 24 "
            "--inspect-samples 10 --batch-size 3 --top-features 16 --device cpu".split()])
    result = read_json(tmp_path / "sae" / "inspect.json")
    tokens = E.load_data(cfg_for(n_ctx=24, eval_samples=10), None, 512)[0]
    h = tiny[0](tokens, output_hidden_states=True).hidden_states[3]
    c = sae(h - h.mean(-1, keepdim=True))[1]  # (10, T, F): all at once, in the centred basis
    best, where = c.max(1)  # (10, F)
    assert len(result["features"]) == 16
    for r in result["features"]:
        f = r["feature"]
        fired = [s for s in best[:, f].argsort(descending=True).tolist() if best[s, f] > 0]
        order = fired[:E.TOP_CONTEXTS]  # the sequences of its largest maxima, largest first
        where_ = [(ctx["sequence"], ctx["position"]) for ctx in r["contexts"]]
        assert where_ == [(s, int(where[s, f])) for s in order], f
        values = [ctx["activation"] for ctx in r["contexts"]]
        assert values == pytest.approx([float(best[s, f]) for s in order], rel=1e-5), f
        assert r["frequency"] == (c[..., f] > 0).sum().item() / c[..., 0].numel()
        mean = c[..., f][c[..., f] > 0].mean().nan_to_num().item()  # 0 if it never fired
        assert r["mean_activation"] == pytest.approx(mean, rel=1e-5), f

def test_compare_dictionaries(tmp_path, capsys):
    # In 2-D, A's elements at 0°, 90°, 180°, 270°, and B is A turned by 30°: each element of A is
    # 30° from its nearest of B (cos 30° = √3/2) and 90° from its nearest other of A (cos 90° = 0).
    angle = torch.tensor([0.0, 90.0, 180.0, 270.0]).deg2rad()
    A, B = (sae_dir(tmp_path / n, dictionary=torch.stack([(angle + t).cos(), (angle + t).sin()]))
            for n, t in (("a", 0), ("b", math.pi / 6)))
    E.main(["--compare", A, B, "--device", "cpu"])
    result = read_json(Path(A, "compare.json"))
    cross, cos30 = result["cross"], math.sqrt(3) / 2
    summary = [cross[k] for k in ("mean", "min", "q1", "median", "q3", "max", "below_0")]
    assert summary == pytest.approx([cos30] * 6 + [0]), summary
    assert cross["values"] == pytest.approx([cos30] * 4, abs=1e-6), cross["values"]
    assert cross["edges"] == [i / 20 for i in range(21)], cross["edges"]
    assert result["within"]["values"] == pytest.approx([0.0] * 4, abs=1e-6)
    assert cross["counts"][17] == 4, cross["counts"]
    assert "cross-SAE max cosine similarity" in capsys.readouterr().out
    # An SAE against itself: every element is in B, at cosine 1 (not above), in the last bin.
    torch.manual_seed(0)
    C = sae_dir(tmp_path / "c", dictionary=F.normalize(torch.randn(16, 40), dim=0))
    E.main(["--compare", C, C, "--device", "cpu", "--out-dir", str(tmp_path / "cc")])
    cross = read_json(tmp_path / "cc" / "compare.json")["cross"]
    assert cross["values"] == pytest.approx([1.0] * 40, abs=1e-6), cross["values"]
    assert max(cross["values"]) <= 1.0, max(cross["values"])
    assert cross["counts"][-1] + cross["below_0"] == 40, cross  # all counted ...
    assert cross["counts"][-1] == 40, cross["counts"]  # ... in the last bin, [0.95, 1]
    # A dictionary of one element: its cross-SAE value, no within-SAE one (it has no other element).
    one = sae_dir(tmp_path / "one", dictionary=torch.tensor([[1.0], [0.0]]))
    E.main(["--compare", one, A, "--device", "cpu"])
    result = read_json(tmp_path / "one" / "compare.json")
    assert result["cross"]["values"] == pytest.approx([1.0]), result
    assert "within" not in result, result
    A, B = F.normalize(torch.randn(37, 8), dim=1), F.normalize(torch.randn(23, 8), dim=1)
    assert torch.allclose(E.max_cosine(A, B, chunk_elements=50), (A @ B.T).max(1).values)
    within = (A @ A.T).fill_diagonal_(-2).max(1).values  # max_cosine a chunk of rows at a time
    assert torch.allclose(E.max_cosine(A, A, exclude_self=True, chunk_elements=50), within)

# --- tutorial.md is true of the file: its names exist, its quoted lines are in it, its debugger
# sessions replay (their line numbers found again from the text they quote, so that code may
# move), its CPU commands run

TUTORIAL = (HERE / "tutorial.md").read_text()
SOURCE_LINES = (HERE / "e2e_sae.py").read_text().splitlines()

def fenced_blocks(info: str) -> list[str]:
    """The bodies of the fenced code blocks whose info string is exactly `info` (indented too)."""
    fence = r"^( *)```" + re.escape(info) + r"\n(.*?)^\1```"
    return [textwrap.dedent(body) for _, body in re.findall(fence, TUTORIAL, flags=re.M | re.S)]
def section(number: int) -> str:
    return TUTORIAL.split(f"\n## {number}. ")[1].split("\n## ")[0]
def same_output(printed: str, expected: str, rel=1e-2, abs=1e-3):
    """The same text, integers equal, decimals within rel (another CPU may round a last digit)."""
    number = r"(-?\d+\.\d+|-?\d+)"
    got, want = re.split(number, printed.strip()), re.split(number, expected.strip())
    assert len(got) == len(want), (printed, expected)
    for g, w in zip(got, want):
        if re.fullmatch(number, w) and "." in w:
            assert float(g) == pytest.approx(float(w), rel=rel, abs=abs), (g, w)
        else:
            assert g == w, (g, w)

def test_the_tutorials_names_quoted_lines_breakpoints_and_flops_are_the_files():
    """Names and exercises' tests exist, section 6's quotes are in the source, breakpoints hold;
    section 7's FLOPs per token of GPT-2 small, and of the whole paper run, come from the code."""
    names = set(re.findall(r"`([A-Za-z_][\w.]*)\(\)`", TUTORIAL))  # functions: `compute_loss()`
    names |= set(re.findall(r"`([A-Z]\w*\.[a-z_]\w*)`", TUTORIAL))  # attributes: `SAE.dictionary`
    names |= set(re.findall(r"`([A-Z][A-Z0-9_]*[A-Z0-9])`", TUTORIAL))  # constants: `TINY_RUN`
    missing = [n for n in names if not hasattr(E, n.split(".")[0])
               or "." in n and not hasattr(getattr(E, n.split(".")[0]), n.split(".")[1])]
    assert len(names) > 60, len(names)
    assert sorted(missing) == []
    tests = set(re.findall(r"`(test_\w+)`", TUTORIAL))  # the tests an exercise names
    assert tests
    assert tests <= set(globals()), tests - set(globals())
    quoted = [q for q in re.findall(r"`([^`\n]+)`", section(6)) if len(q) >= 20]
    assert len(quoted) >= 20, len(quoted)
    assert [q for q in quoted if q not in "\n".join(SOURCE_LINES)] == []
    assert (HERE / "figures" / "kl_vs_l0.png").is_file()
    assert "](figures/kl_vs_l0.png)" in TUTORIAL
    with torch.device("meta"):  # shapes only: GPT-2 small without memory
        gpt2 = GPT2LMHeadModel(GPT2Config())
    sae = SimpleNamespace(encoder=SimpleNamespace(weight=torch.empty(46080, 768, device="meta")))
    for loss in ("e2e", "local"):
        flops = E.flops_per_token(gpt2, E.decoder_blocks(gpt2), sae, loss, 6, 1024)
        assert f"{flops / 1e9:.3f}" in section(7), f"{flops / 1e9:.3f} GFLOP per token"
        assert f"{flops * 409.6e6 / 1e18:.2f}" in section(7), f"{flops * 409.6e6 / 1e18:.2f} EFLOP"


def test_the_tutorials_debugger_sessions_replay_as_printed(tmp_path, monkeypatch, capsys):
    """Section 4 as a reader meets it: each command runs with real pdb reading, on its standard
    input, what the transcript shows typed after each (Pdb) prompt (first the pasted block). Every
    stop (line number, function, the line shown) and every printed line is the transcript's, with
    decimals within 0.1% (another CPU may round differently), but for the run's timing line."""
    programs = [shlex.split(b)[2] for b in re.findall(r"```bash\n(python -c .*?)\n```", section(4))]
    pastes = [block.splitlines() for block in re.findall(r"```pdb\n(.*?)\n```", section(4), re.S)]
    transcripts = re.findall(r"^```\n(> e2e_sae\.py\(.*?)\n```", section(4), flags=re.M | re.S)
    sessions = list(zip(programs, pastes, transcripts, strict=True))
    assert len(sessions) == 3, "an e2e, a local and an e2e_ds session"
    monkeypatch.chdir(tmp_path)
    for program, pasted, transcript in sessions:
        typed = re.findall(r"^\(Pdb\) (.*)$", transcript, flags=re.M)
        assert typed[:len(pasted)] == pasted, (typed, pasted)
        assert [line for line in pasted if "#" in line] == [], "pdb rejects a line with a comment"
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(typed) + "\n"))
        bdb.Breakpoint.next, bdb.Breakpoint.bplist, bdb.Breakpoint.bpbynumber = 1, {}, [None]
        capsys.readouterr()
        try:
            exec(program, {})
        finally:
            sys.settrace(None)
        live = capsys.readouterr().out.replace(str(HERE) + "/", "").split("(Pdb) ")
        recorded = re.split(r"^\(Pdb\) .*\n?", transcript, flags=re.M)
        assert len(live) == len(recorded), f"{len(live) - 1} prompts, not {len(recorded) - 1}"
        for got, want in zip(live, recorded):
            got, want = ("\n".join(line for line in text.splitlines()
                                   if line.strip() and not line.startswith("trained on"))
                         for text in (got, want))
            same_output(got, want, rel=1e-3, abs=1e-6)


def test_the_tutorials_cpu_commands_run(tmp_path, monkeypatch, capsys):
    """`bash cpu` commands in order, in one folder, training cut to one step except section 3.11's
    (seconds at full size: it shows what they print); `python cpu` blocks; the figure's code."""
    monkeypatch.chdir(tmp_path)
    blocks = fenced_blocks("bash cpu")
    assert len([line for b in blocks for line in b.splitlines() if line.strip()]) >= 10
    for block in blocks:
        printed = []
        for line in filter(str.strip, block.splitlines()):
            args = shlex.split(line, comments=True)
            assert args[:2] == ["python", "e2e_sae.py"], line
            trains = not {"--compare", "--eval-only", "--resume", "--benchmark"} & set(args)
            if "--inspect" not in block and trains:  # one step of TINY_RUN's 8 × 2
                args += ["--n-samples", "16", "--eval-every", "0", "--eval-samples", "8"]
            capsys.readouterr()
            E.main(args[2:])  # an error would exit, and fail the test
            printed.append(capsys.readouterr().out)
        if "--inspect" in block:  # the analysis: what the tutorial shows the last two print
            shown = section(3).split("The last two printed:\n\n```\n")[1].split("\n```")[0]
            same_output("".join(printed[-2:]), shown)
    snippets = fenced_blocks("python cpu")
    for code in snippets:
        exec(compile(code, "tutorial.md", "exec"), {})
    assert snippets
    assert "'kl': 0.0" in capsys.readouterr().out
    assert (tmp_path / "out/sweep/local_16/sae.safetensors").exists()
    plt, fig, ax = MagicMock(), MagicMock(), MagicMock()
    plt.subplots.return_value = (fig, ax)
    monkeypatch.setitem(sys.modules, "matplotlib", MagicMock(pyplot=plt))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    exec(compile(section(9).split("```python\n")[1].split("\n```")[0], "tutorial.md", "exec"), {})
    plotted = [(len(c.args[0]), c.kwargs["label"]) for c in ax.plot.call_args_list]
    assert plotted == [(3, "e2e"), (3, "local")], plotted
    fig.savefig.assert_called_once_with("figures/kl_vs_l0.png", dpi=150)


# =================================================================================================
# From a notebook, and on a GPU: the SAE's basis travels with it, evaluation reads no process
# state, logits are read in chunks, GPT-2's GELU is fused, a GPU's checkpoint resumes on a CPU
# =================================================================================================
@pytest.mark.parametrize("center", [True, False], ids=["centred", "raw"])
def test_load_sae_and_evaluate_with_defaults_give_the_runs_own_metrics(tmp_path, alone, center):
    """What a notebook does with a finished run: load_sae(), the tiny model, the run's held-out
    sequences, evaluate() with its defaults. The numbers are the run's metrics.json."""
    out = alone if center else tmp_path / "run"
    if not center:
        E.main(["--model", "tiny", "--n-samples", "16", "--eval-samples", "8", "--eval-every", "0",
                "--out-dir", str(out), "--no-center"])
    saved, (sae, cfg) = read_json(out / "metrics.json"), E.load_sae(out)
    assert sae.center == center, f"sae.center {sae.center}"
    model = E.tiny_gpt2()
    eval_tokens = E.load_data(cfg, None, model.config.vocab_size)[0]
    m = E.evaluate(model, E.decoder_blocks(model), sae, eval_tokens, cfg.layer)
    for k in ("kl", "mse", "ce_loss_orig", "ce_loss_sae", "explained_variance", "l0"):
        # to rounding: the saved dictionary, already unit-norm, is normalised again when loaded
        assert m[k] == pytest.approx(saved[k], rel=1e-6), f"{k}: {m[k]} against {saved[k]}"

# --- A GPU's peak memory, estimated on the CPU: fake tensors allocate nothing -------------------
class PeakMemory(TorchDispatchMode):
    """The most bytes of storages made meanwhile alive at once, in CUDA's 512-byte blocks (.peak),
    and the op that reached it (.at). A storage counts from its making to its last view's end."""
    def __init__(self):
        super().__init__()
        self.sizes, self.peak, self.at = weakref.WeakKeyDictionary(), 0, ""  # of live storages
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and (s := x.untyped_storage()) not in self.sizes:
                self.sizes[s] = -(-s.nbytes() // 512) * 512
                if (live := sum(self.sizes.values())) > self.peak:
                    self.peak, self.at = live, f"{func} → {tuple(x.shape)} {x.dtype}"
        return out

def memory_estimate(loss="e2e", B=8, T=1024, model="gpt2-random", fake=True, **config):
    """(one training step's, one evaluation batch's) PeakMemory above the weights, the SAE and
    Adam's moments, in bf16 autocast, on fake tensors (or real ones, fake=False). CPU autocast
    stands in for CUDA's: for this file's ops both give the same peaks. A fake tensor has no value
    to read: the training step runs through, as it waits for no GPU."""
    cfg = cfg_for(loss, model=model, batch_size=B, n_ctx=T, dtype="bf16", **config)
    no_move = patch.object(torch.nn.Module, "to", lambda module, *args, **kwargs: module)
    # Transformers takes fake tensors for a trace and makes attention masks; on a GPU it makes none
    # for sequences that are not packed, which it checks by reading a value fakes do not hold.
    no_masks = patch.multiple(transformers.masking_utils, is_tracing=lambda *args: False,
                              find_packed_sequence_indices=lambda position_ids: None)
    with FakeTensorMode() if fake else nullcontext(), no_move, no_masks:
        run = E.setup(cfg)
        tokens = list(torch.randint(run.model.config.vocab_size, (cfg.grad_accum, B, T)))
        E.train_step(cfg, run, tokens)  # Adam's moments are made in the first step
        with PeakMemory() as step:
            E.train_step(cfg, run, tokens)
        with PeakMemory() as evaluation, suppress(DataDependentOutputException):  # its last
            E.evaluate_and_log(cfg, run, tokens[0], None, 0, final=True)  # lines read values
    return step, evaluation

def two_blocks(**config):
    return lambda: E.random_gpt2(GPT2Config(n_layer=2, **config))

def test_the_memory_estimate_is_what_real_tensors_take(monkeypatch):
    """A tiny run's peaks on fake tensors are those of the same run on real ones."""
    monkeypatch.setitem(E.RANDOM_MODELS, "tiny", two_blocks(n_embd=64, n_head=4, vocab_size=512))
    fake, real = (memory_estimate("e2e", 2, 64, "tiny", f, layer=1, dict_ratio=4)
                  for f in (True, False))
    assert fake[0].peak == real[0].peak, f"step: fake {fake[0].peak:,} B, real {real[0].peak:,} B"
    assert fake[1].peak == real[1].peak, f"evaluation: {fake[1].peak:,} B, {real[1].peak:,} B"

def test_an_evaluation_batch_needs_less_memory_than_a_training_step(monkeypatch):
    """GPT-2 small's widths and vocabulary in 2 blocks, F = 60 × 768, 2 × 512 tokens."""
    monkeypatch.setitem(E.RANDOM_MODELS, "gpt2-random", two_blocks())
    step, evaluation = memory_estimate("e2e", 2, 512, layer=1)
    assert evaluation.peak < step.peak, (f"evaluation {evaluation.peak / 2**30:.2f} GiB at "
                                         f"{evaluation.at}; step {step.peak / 2**30:.2f} GiB")

# --- What a newcomer meets first: fast answers, what a run says, where it writes, errors that name
# the problem
HEAVY = ("transformers", "datasets", "pyarrow", "pandas")  # seconds to import, beyond torch's

def test_help_and_flag_errors_come_before_the_heavy_libraries_are_imported(tmp_path):
    """--help, a bad flag and a local model without the block --layer names, in a fresh process as a
    user starts one: each answered without importing transformers or datasets."""
    model = Path(write(tmp_path, "model/config.json", json.dumps({"n_layer": 3}))).parent
    script = textwrap.dedent(f"""
        import runpy, sys
        for argv in (["--help"], ["--lr", "fast"], ["--model", {str(model)!r}, "--layer", "99"]):
            sys.argv = ["e2e_sae.py", *argv]
            try:
                runpy.run_path("e2e_sae.py", run_name="__main__")
            except SystemExit as e:
                print("exit", e.code)
        print("imported", [name for name in {HEAVY!r} if name in sys.modules])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True)
    said = done.stdout.splitlines()
    assert said[-1] == "imported []", f"imported: {said[-1]}"
    assert "--n-samples INT" in done.stdout, done.stdout[-300:]  # the help, then two errors
    assert [s for s in said if s.startswith("exit")] == ["exit 0", "exit 2", "exit 2"], said
    assert "invalid float value: 'fast'" in done.stderr, done.stderr
    assert "--layer 99 is outside the model's blocks 0 … 2" in done.stderr, done.stderr

if __name__ == "__main__":  # python test_e2e_sae.py: the estimates at GPT-2 small's shapes
    print("Peak GPU memory above the weights, the SAE and Adam's moments, GiB (estimated, bf16)")
    for loss, B in ("e2e", 8), ("e2e", 32), ("local", 8), ("e2e_ds", 8):
        step, evaluation = memory_estimate(loss, B, layer=6)
        print(f"{loss:6} {B:2} × 1024: training step {step.peak / 2**30:5.2f} ({step.at}), "
              f"evaluation batch {evaluation.peak / 2**30:5.2f} ({evaluation.at})")
