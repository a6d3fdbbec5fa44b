"""
End-to-end sparse dictionary learning in one file.

Braun, Taylor, Goldowsky-Dill, Sharkey (2024), "Identifying Functionally Important Features with
End-to-End Sparse Dictionary Learning", arXiv:2405.12241.

A sparse autoencoder (SAE) reads the residual stream `a` entering block L of a language model and
writes back a sparse reconstruction `â`:

    c = ReLU(W_e a + b_e)     â = D_n c + b_d     (D_n: the decoder with unit-norm columns)

As the paper's SAEs do, it reads a in TransformerLens's basis: the stream minus its mean over D
(see in_basis). This file trains it with any of the paper's three losses, where φ = λ / D:

    local    MSE(â, a)                                  + φ‖c‖₁   (reconstruct the activations)
    e2e      KL(P_orig ‖ P_sae)                         + φ‖c‖₁   (keep the model's output)
    e2e_ds   0.5·KL + (β/N) Σ_k MSE(a_k^sae, a_k^orig)  + φ‖c‖₁   (... and the later layers too)

They are points of one family, α·MSE(â, a) + κ·KL + (β/N) Σ_k MSE(a_k^sae, a_k^orig) + φ‖c‖₁, with
(α, κ, β) = (1, 0, 0), (0, 1, 0), (0, 0.5, β); e2e with α > 0 (--mse-coeff), started from a local
SAE (--init-from), is the KL + MSE fine-tuning of Karvonen et al. (2025, arXiv:2503.17272).

Run it:

    python e2e_sae.py --loss e2e --layer 6        # the paper's GPT-2 small run (GPU, downloads)
    python e2e_sae.py --model tiny                # a random 12-block GPT-2: seconds on a CPU
    python e2e_sae.py --eval-only --sae out/gpt2_e2e_layer6
    python e2e_sae.py --benchmark --loss e2e --layer 6            # tokens/s, MFU, memory
    torchrun --nproc_per_node=8 e2e_sae.py --loss e2e --layer 6   # the same run on 8 GPUs
    python e2e_sae.py --help                      # every flag, with its default

The file reads top to bottom: the configuration; the method (the SAE, the hook that splices it into
the model, the losses, evaluation); then the engineering around it (models and data, many processes,
the output folder and checkpoints, the training loop, speed, analysis, the command line).
tutorial.md walks through it. One symbol per quantity, in the paper's letters where it has one:
    B batch (sequences)   T positions   D model width   F dictionary size   V vocabulary
    E evaluation sequences   N downstream layers (the blocks after L)   L the SAE's layer
    a, â, c   the stream entering block L, its reconstruction, the sparse code
    W_e, b_e, D_n, b_d   encoder, its bias, dictionary (decoder, unit-norm columns), decoder bias
    λ, φ = λ/D   sparsity coefficient      α, κ, β   weights of MSE(â, a), the KL, downstream MSE
    P_orig, P_sae   the next-token distributions of the clean and the spliced model
In code, F is torch.nn.functional, as everywhere in PyTorch; the dictionary size is dict_size.
"""

import argparse, io, itertools, json, math, os, random, re, signal, sys, time, typing
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


def import_libraries():
    """transformers and datasets: seconds to import, so main() imports them after the flags."""
    global datasets, transformers
    import datasets, transformers


if __name__ != "__main__":  # imported (tests, a notebook), not run: at once
    import_libraries()

# -----------------------------------------------------------------------------
# Configuration

PAPER_DATASET = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
# λ and β of the paper's GPT-2 small runs with similar CE loss increase at layers 2, 6 and 10
# (appendix table). Other layers interpolate geometrically (the coefficients are scales) and take
# the nearest end's value beyond. The weight of the KL term: e2e_ds halves it, since the downstream
# MSE also pulls towards the original model.
PAPER_LAYERS = (2, 6, 10)
PAPER_SPARSITY_COEFF = {"local": (0.8, 4, 6), "e2e": (0.5, 3, 1.5), "e2e_ds": (10, 50, 1.75)}
PAPER_DOWNSTREAM_COEFF = (2.5, 2.5, 0.05)
PAPER_KL_COEFF = {"local": 0.0, "e2e": 1.0, "e2e_ds": 0.5}
# Presets: defaults that a flag changes (the flags given still win). `--model tiny` makes a run of
# seconds; `--benchmark` takes GPT-2 small's shapes, random weights and tokens, 1 × 128 on a CPU.
TINY_RUN = dict(dataset="random", n_ctx=128, n_samples=1024, eval_samples=32, warmup_samples=128,
                eval_every=512)
BENCHMARK_RUN = dict(model="gpt2-random", dataset="random", grad_accum=1)
BENCHMARK_RUN_CPU = dict(batch_size=1, n_ctx=128, bench_warmup=1, bench_steps=3)


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, the network): main() says it in one sentence."""


def need(ok, message):
    """The one way a failed check becomes a UserError (explain() is the one way an error does)."""
    if not ok:
        raise UserError(message)


@contextmanager
def explain(what):
    """Any error inside the block becomes a UserError: `what`, with the error's first sentence in
    brackets (not advice after it, such as torch's to load with weights_only=False)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        first = re.split(r"\. |\n", str(e).strip() or type(e).__name__)[0]
        raise UserError(f"{what} ({first})") from None


@dataclass
class Config:  # every field is a flag (n_samples: --n-samples); its comment is the flag's --help
    # what to train
    model: str = "gpt2"  # HF hub id or save_pretrained folder; 'gpt2-random' and 'tiny' are random
    dataset: str = PAPER_DATASET  # hub id (streamed), .txt file or folder, .jsonl, .parquet, random
    loss: str = "e2e"  # local | e2e | e2e_ds
    layer: int = 6  # L: the SAE reads and replaces the residual stream entering block L
    dict_ratio: float = 60.0  # F / D: the dictionary size as a multiple of the model width
    init_from: str | None = None  # start from this saved SAE (any that --sae reads), not a new one
    sparsity_coeff: float | None = None  # λ, φ = λ/D (default: the paper's at layers 2/6/10, local 0.8/4/6, e2e 0.5/3/1.5, e2e_ds 10/50/1.75; interpolated between)
    kl_coeff: float | None = None  # weight of the KL term (default: 1 for e2e, 0.5 for e2e_ds)
    mse_coeff: float | None = None  # α: weight of MSE(â, a) (default: 1 for local, else 0)
    downstream_coeff: float | None = None  # β: weight of e2e_ds's downstream MSE (default: the paper's, 2.5/2.5/0.05 at layers 2/6/10)
    center: bool = True  # read the stream minus its mean over D, as TransformerLens (LayerNorm)
    # data and optimisation (sample counts are in sequences of n_ctx tokens)
    n_samples: int = 400_000  # training sequences in total
    batch_size: int = 8  # sequences per micro-batch (of all processes together, under torchrun)
    grad_accum: int = 2  # micro-batches per optimiser step
    n_ctx: int = 1024  # tokens per sequence
    lr: float = 5e-4  # Adam's learning rate after the warm-up
    lr_min_ratio: float = 0.1  # the cosine schedule decays the learning rate to this fraction
    warmup_samples: int = 20_000  # linear learning-rate warm-up, in sequences
    grad_clip: float = 10.0  # maximum gradient norm
    shuffle_buffer: int = 1000  # hub datasets are shuffled through a buffer of this many sequences
    seed: int = 0  # seed of the SAE's initialisation and of the training order
    # evaluation and output
    eval_samples: int = 500  # the dataset's first this-many sequences, held out: never trained on
    eval_every: int = 20_000  # evaluate every this-many training sequences (0: only at the end)
    log_every: int = 10  # write a training line to log.jsonl every this-many optimiser steps
    out_dir: str | None = None  # output folder (default: out/<model>_<loss>_layer<L>)
    save_every: int = 20_000  # checkpoint every this-many training sequences (0: only on signals)
    resume: str | None = None  # continue the run in this output folder from its checkpoint
    overwrite: bool = False  # replace the run already in --out-dir
    # hardware
    device: str | None = None  # cuda, cpu, cuda:1, ... (default: cuda if there is one)
    dtype: str | None = None  # autocast dtype: bf16 or fp32 (default: bf16 on CUDA, fp32 on a CPU)
    compile: bool = False  # torch.compile the blocks and the SAE (a slower start, faster steps)
    # measuring speed
    benchmark: bool = False  # time training steps on random tokens (see BENCHMARK_RUN); no files
    bench_warmup: int = 3  # --benchmark: untimed steps first (compilation, allocator, kernels)
    bench_steps: int = 10  # --benchmark: timed optimiser steps
    # evaluating and looking inside a saved SAE
    eval_only: bool = False  # evaluate the SAE in --sae instead of training one
    sae: str | None = None  # --eval-only, --inspect: a run's or SAELens's folder, or a paper's .pt
    inspect: bool = False  # show the contexts where the elements of --sae fire, and how often
    features: str | None = None  # --inspect: comma-separated dictionary elements, e.g. 12,345
    top_features: int = 10  # --inspect without --features: the this-many most often firing
    inspect_samples: int | None = None  # --inspect: the first this-many sequences (--eval-samples)
    compare: list[str] | None = None  # each element of SAE A's largest cosine with B's, and A's

    def __post_init__(self):  # the defaults that depend on other fields, then the checks
        need(self.loss in PAPER_KL_COEFF,
             f"--loss must be one of local, e2e, e2e_ds, not {self.loss!r}")
        paper = lambda v: float(f"{np.exp(np.interp(self.layer, PAPER_LAYERS, np.log(v))):.4g}")
        defaults = dict(sparsity_coeff=paper(PAPER_SPARSITY_COEFF[self.loss]),
                        downstream_coeff=paper(PAPER_DOWNSTREAM_COEFF),
                        kl_coeff=PAPER_KL_COEFF[self.loss], mse_coeff=float(self.loss == "local"))
        for name, value in defaults.items():  # a coefficient not given is the paper's
            if getattr(self, name) is None:
                setattr(self, name, value)
        local = Path(self.model).expanduser()  # a model's folder (or a hub id, or tiny): its name
        self.out_dir = self.resume or self.out_dir or f"out/{local.absolute().name}_{self.loss}_layer{self.layer}"
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype or ("bf16" if self.device.startswith("cuda") else "fp32")
        positive = ("n_samples batch_size grad_accum n_ctx lr dict_ratio log_every shuffle_buffer "
                    "eval_samples bench_steps top_features inspect_samples").split()
        for name, value in asdict(self).items():
            flag = f"--{name.replace('_', '-')}"
            if type(value) in (int, float):
                need(math.isfinite(value) and value >= 0,
                     f"{flag} must be a finite number ≥ 0, not {value}")
                need(value > 0 or name not in positive, f"{flag} must be > 0, not {value}")
        need(self.n_ctx >= 2, "--n-ctx must be at least 2 (a prediction needs two tokens)")
        need(self.lr_min_ratio <= 1, "--lr-min-ratio must be between 0 and 1")
        need(self.eval_only or self.inspect or self.n_samples >= self.samples_per_step,
             f"--n-samples {self.n_samples} is less than one optimiser step "
             "(--batch-size × --grad-accum)")
        need(self.dtype in "bf16 fp32".split(), f"--dtype must be bf16 or fp32, not {self.dtype!r}")
        with explain(f"--device must be a device such as cpu, cuda or cuda:1, not {self.device!r}"):
            torch.device(self.device)
        need(self.sae or not (self.eval_only or self.inspect),
             "--eval-only and --inspect need --sae DIR")
        with explain(f"--model {self.model}: no such folder, or no readable config.json in it"):
            c = json.loads((local / "config.json").read_text()  # before transformers is imported
                           if local.is_dir() or looks_like_path(self.model) else "{}")
        n = c.get("n_layer") or c.get("num_hidden_layers") or math.inf
        need(self.layer < n, f"--layer {self.layer} is outside the model's blocks 0 … {n - 1}")

    @property
    def samples_per_step(self):
        return self.batch_size * self.grad_accum


# ==================================================================================================
# The method: the SAE, the hook that splices it into the model, the losses, evaluation
# ==================================================================================================

# -----------------------------------------------------------------------------
# The SAE


class SAE(nn.Module):
    """
    c = ReLU(W_e a + b_e)        W_e: (F, D), b_e: (F,)      the sparse code
    â = D_n c + b_d              D_n: (D, F), b_d: (D,)      the reconstruction
    D_n is the decoder weight, each column (dictionary element) scaled to unit L2 norm inside
    forward(): gradients flow through it, so the L1 penalty on c cannot be dodged by shrinking c
    while growing the dictionary. No pre-encoder bias. It knows its basis (.center: in_basis)."""

    def __init__(self, d_model: int, dict_size: int, center: bool = True):
        super().__init__()
        self.center = center  # reads a − mean_D(a), TransformerLens's basis (else a as it is)
        self.encoder = nn.Linear(d_model, dict_size)  # W_e, b_e: PyTorch's default init
        self.decoder = nn.Linear(dict_size, d_model)  # weight (D, F) and b_d
        nn.init.orthogonal_(self.decoder.weight.data.T)  # the (D, F) weight gets orthonormal rows

    @property
    def dictionary(self) -> torch.Tensor:
        return F.normalize(self.decoder.weight, dim=0)  # D_n: (D, F), unit-norm columns

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.relu(self.encoder(a))  # (B, T, F)
        a_hat = F.linear(c, self.dictionary, self.decoder.bias)  # (B, T, D)
        return a_hat, c


# -----------------------------------------------------------------------------
# The hook: replacing the residual stream of a Hugging Face model


class StopForward(Exception):
    """Raised by the splice hook to end the forward pass at block L: local losses need no more."""


def in_basis(h, center, a_hat=None):
    """A residual stream h (…, D) in the basis the SAE reads. The paper's library runs GPT-2 in
    TransformerLens, which centres every weight that writes into the stream, so its stream is HF's
    h − mean_D(h). In a run that â entered, the stream there is â plus centred writes: it keeps
    mean_D(â), which is HF's h − mean_D(h) + mean_D(â). Without center, h is the basis."""
    if not center:
        return h
    return h - h.mean(-1, keepdim=True) + (0 if a_hat is None else a_hat.mean(-1, keepdim=True))


def splice_hook(seen, sae, stop, block, args, kwargs):
    """The forward pre-hook that splice_sae() puts on block L: the block's input a is replaced by
    the SAE's reconstruction â. It keeps a (in the SAE's basis, see in_basis), â and c in `seen`."""
    a = args[0] if args else kwargs["hidden_states"]  # (B, T, D), positional or keyword
    seen.a = in_basis(a, seen.center)  # (B, T, D)
    seen.a_hat, seen.c = sae(seen.a)  # (B, T, D), (B, T, F)
    if stop:
        raise StopForward
    # â goes in place of a as it is. With center this is exact for LayerNorm models: every reader
    # of the stream is a LayerNorm, LN(x + k·1) = LN(x), and a − a_c = mean_D(a)·1.
    a_hat = seen.a_hat.to(a.dtype)  # autocast may make â bf16; the stream keeps its dtype
    return ((a_hat, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": a_hat})


@contextmanager
def splice_sae(block, sae, stop=False):
    """Within the block, the SAE's â replaces the input a of `block` (splice_hook): so training and
    evaluation alike put the SAE into the model. Yields the namespace where the hook keeps a, â, c
    of the latest pass, and the SAE's basis (raw for a function). sae: an SAE, its DDP wrapper, or
    any function a ↦ (â, c). With stop, the pass ends once the SAE has run."""
    seen = SimpleNamespace(center=getattr(getattr(sae, "module", sae), "center", False))  # (DDP's)
    hook = partial(splice_hook, seen, sae, stop)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def run_model(model, tokens, hidden_states=False):
    """The model on tokens (B, T) without its unembedding: .last_hidden_state (B, T, D), after the
    final norm; with hidden_states, .hidden_states[k] (B, T, D), the input of block k < n_layer (â's
    from L on in a spliced run; the last is .last_hidden_state), by pre-hooks outside the blocks'
    compiled forward() (HF's output_hidden_states: a graph break per block). None if stopped."""
    inputs, blocks = [], decoder_blocks(model) if hidden_states else []  # (B, T, D) each
    record = lambda block, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"])
    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        out = model.base_model(input_ids=tokens, use_cache=False)
        out.hidden_states = (*inputs, out.last_hidden_state) if hidden_states else None
        return out
    except StopForward:
        return None
    finally:
        for handle in handles:
            handle.remove()


def unembed(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits (…, V) of final hidden states (…, D) through the unembedding `head` (W_U: (V, D)), in
    fp32 outside autocast: GPT-2's logits lie tens of units below zero, where neighbouring bf16
    numbers are 0.125–0.5 apart, so a bf16 KL would measure rounding."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), head.weight, head.bias)


# -----------------------------------------------------------------------------
# The losses: pure functions of tensors, in the paper's symbols. "Mean over tokens": over all B·T.


def sparsity(c: torch.Tensor, phi: float) -> torch.Tensor:
    """φ · mean_tokens ‖c‖₁, with φ = λ / D so that one λ works across model widths. c comes out of
    a ReLU, so ‖c‖₁ is the plain sum over F, accumulated in fp32 without an fp32 copy of c."""
    return phi * c.sum(-1, dtype=torch.float32).mean()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (tokens × D), in fp32."""
    return F.mse_loss(x.float(), y.float())


def kl_div(logits_orig: torch.Tensor, logits_sae: torch.Tensor) -> torch.Tensor:
    """KL(P_orig ‖ P_sae) = mean_tokens Σ_v P_orig(v) (log P_orig(v) − log P_sae(v)), from (B, T, V)
    logits; the log-softmax and the sum over V run in fp32."""
    log_p_orig = F.log_softmax(logits_orig.float(), dim=-1).flatten(0, -2)  # (B·T, V)
    log_p_sae = F.log_softmax(logits_sae.float(), dim=-1).flatten(0, -2)  # (B·T, V)
    # With log_target, F.kl_div(input, target) sums exp(target) · (target − input)
    #   = Σ_v P_orig(v) (log P_orig(v) − log P_sae(v)); "batchmean" divides by the B·T rows.
    return F.kl_div(log_p_sae, log_p_orig, log_target=True, reduction="batchmean")


def local_loss(a, a_hat, c, phi, alpha=1.0):
    """L_local = α·MSE(â, a) + φ‖c‖₁   (α = 1 in the paper)"""
    terms = {"mse": mse(a_hat, a), "sparsity": sparsity(c, phi)}
    return alpha * terms["mse"] + terms["sparsity"], terms


def e2e_loss(kl, c, phi, kappa=1.0):
    """L_e2e = κ·KL(P_orig ‖ P_sae) + φ‖c‖₁   (κ = 1 in the paper)"""
    terms = {"kl": kl, "sparsity": sparsity(c, phi)}
    return kappa * terms["kl"] + terms["sparsity"], terms


def e2e_ds_loss(kl, c, resid_orig, resid_sae, phi, beta, kappa=0.5):
    """L_e2e+ds = κ·KL(P_orig ‖ P_sae) + φ‖c‖₁ + (β/N) Σ_k MSE(a_k^sae, a_k^orig)  (κ = 0.5 in the
    paper); resid_orig, resid_sae: the N streams (B, T, D) entering blocks L+1 … n_layer−1."""
    loss, terms = e2e_loss(kl, c, phi, kappa)
    terms["downstream"] = sum(mse(s, o) for s, o in zip(resid_sae, resid_orig)) / len(resid_orig)
    return loss + beta * terms["downstream"], terms


# -----------------------------------------------------------------------------
# A training step. By definition the e2e KL is kl_div(unembed(head, h_orig), unembed(head, h_sae))
# of the two runs' final hidden states; UnembedKL computes the same KL and gradient without ever
# holding the (B, T, V) logits, which for GPT-2 are 1.6 GB per copy at 8 × 1024 tokens in fp32.


def log_softmax_chunks(head, hs, chunk_rows=None):
    """log P over the vocabulary of each final hidden state in hs ((B·T, D) each), chunk_rows
    positions at a time (by default 2²⁵ logits, 128 MiB in fp32): yields (the positions' slice,
    [log P (rows, V) of each h]). Training and evaluation read logits so: no (B·T, V) tensor."""
    rows = chunk_rows or max(1, 2**25 // len(head.weight))
    for i in range(0, len(hs[0]), rows):
        yield slice(i, i + rows), [F.log_softmax(unembed(head, h[i:i + rows]), -1) for h in hs]


class UnembedKL(torch.autograd.Function):
    """kl_div of the logits of final hidden states h_orig and h_sae (B, T, D), a chunk of positions
    at a time (log_softmax_chunks); each chunk's gradient is computed on the spot, so nothing of
    size V is kept for backward. The unembedding is frozen and h_orig is a constant: neither gets a
    gradient. With z = unembed(h) over the M = B·T positions:

        KL = (1/M) Σ_positions Σ_v P_orig(v) (log P_orig(v) − log P_sae(v))
        ∂KL/∂z_sae = (P_sae − P_orig) / M        ∂KL/∂h_sae = (P_sae − P_orig) W_U / M"""

    @staticmethod
    def forward(ctx, h_orig, h_sae, head, chunk_rows):
        h_o, h_s = h_orig.flatten(0, -2), h_sae.flatten(0, -2)  # (M, D)
        kl = torch.zeros((), device=h_s.device)
        grad = torch.empty_like(h_s, dtype=torch.float32)  # (M, D): ∂KL/∂h_sae, row by row
        with torch.autocast(h_s.device.type, enabled=False):  # all in fp32: see unembed()
            for rows, (log_p_orig, log_p_sae) in log_softmax_chunks(head, (h_o, h_s), chunk_rows):
                p_orig = log_p_orig.exp()  # (rows, V)
                kl += (p_orig * (log_p_orig - log_p_sae)).sum()
                grad[rows] = (log_p_sae.exp() - p_orig) @ head.weight  # (rows, D)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = h_sae.shape, h_sae.dtype
        return kl / len(h_s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return None, (grad * (grad_kl / len(grad))).view(ctx.shape).to(ctx.dtype), None, None


unembed_kl = UnembedKL.apply  # (h_orig, h_sae, head, chunk_rows or None) → KL(P_orig ‖ P_sae)


def compute_loss(cfg, model, blocks, sae, tokens, kl_chunk_rows=None):
    """One micro-batch of tokens (B, T) → (loss, its terms, c) for cfg's loss, layer, coefficients.
    sae (the SAE or its DDP wrapper) enters block L through splice_sae; local stops there. The e2e
    losses run the model clean (no gradients) and spliced, and take the KL of their final hidden
    states (unembed_kl). Only the SAE learns: the model is frozen, and blocks < L don't see it."""
    L, ds = cfg.layer, cfg.loss == "e2e_ds"
    phi = cfg.sparsity_coeff / model.config.hidden_size  # φ = λ / D
    if cfg.loss == "local":
        with splice_sae(blocks[L], sae, stop=True) as seen:
            run_model(model, tokens)  # blocks 0 … L−1, then the SAE on their output a
        return *local_loss(seen.a, seen.a_hat, seen.c, phi, cfg.mse_coeff), seen.c
    with torch.no_grad():
        orig = run_model(model, tokens, hidden_states=ds)  # the clean run
    with splice_sae(blocks[L], sae) as seen:
        spliced = run_model(model, tokens, hidden_states=ds)  # the run with â in place of a
    head = model.get_output_embeddings()  # W_U
    kl = unembed_kl(orig.last_hidden_state, spliced.last_hidden_state, head, kl_chunk_rows)
    if ds:
        after = slice(L + 1, len(blocks))  # the inputs of blocks L+1 … n_layer−1, in a's basis
        resid_orig = [in_basis(h, seen.center) for h in orig.hidden_states[after]]
        resid_sae = [in_basis(h, seen.center, seen.a_hat) for h in spliced.hidden_states[after]]
    loss, terms = (e2e_ds_loss(kl, seen.c, resid_orig, resid_sae, phi, cfg.downstream_coeff,
                               cfg.kl_coeff) if ds else e2e_loss(kl, seen.c, phi, cfg.kl_coeff))
    if cfg.mse_coeff:  # + α·MSE(â, a): the family of losses in the docstring at the top
        terms["mse"] = mse(seen.a_hat, seen.a)
        loss = loss + cfg.mse_coeff * terms["mse"]
    return loss, terms, seen.c


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, blocks, sae, eval_tokens, layer, batch_size=8, autocast=nullcontext,
             all_reduce=None):
    """The SAE spliced in at `layer` against the clean model, on eval_tokens (E, T); a and â are in
    the SAE's basis (see in_basis). "zero" is the model with the stream entering block L replaced by
    zeros. Every metric pools sums over all evaluation tokens (no means of per-batch means):
      ce_loss_orig, ce_loss_sae   mean next-token cross-entropy over the E·(T−1) predictions
      ce_loss_increase            ce_loss_sae − ce_loss_orig
      kl                          KL(P_orig ‖ P_sae), as in the loss, over all E·T positions
      ce_loss_zero, kl_zero       the same for the zero model
      ce_loss_score               (ce_loss_zero − ce_loss_sae) / (ce_loss_zero − ce_loss_orig)
      kl_score                    (kl_zero − kl) / kl_zero      (SAELens's and SAEBench's scores)
      l0                          mean number of c > 0 per token
      alive_dict_elements         elements with c > 0 on at least one evaluation token
      explained_variance          1 − Σ‖a − â‖² / Σ‖a − ā‖², ā the mean of a over the tokens
      mse                         mean over elements of (â − a)²
      top1_agreement              fraction of positions where both models' argmax agree
      downstream_mse              {k: mean over elements of (a_k^sae − a_k^orig)²} for blocks k > L
      n_eval_tokens               E·T
    With many processes: each one's share, and an all_reduce adding up all their sums in place."""
    head, after = model.get_output_embeddings(), range(layer + 1, len(blocks))
    device, (dict_size, D) = sae.decoder.bias.device, sae.encoder.weight.shape
    zeros = partial(torch.zeros, dtype=torch.float64, device=device)  # sums on the device: no waits
    sum_rows = partial(torch.sum, dtype=torch.float64)  # per position in fp32, then exact
    ce, kl, agree, sse, sum_sq_a = zeros(3), zeros(2), zeros(1), zeros(1), zeros(1)
    sum_a, fires, sse_ds = zeros(D), zeros(dict_size), zeros(len(after))  # (D,), (F,), (N,)
    for tokens in eval_tokens.split(batch_size) if len(eval_tokens) else []:
        tokens = tokens.to(device)  # (B, T)
        with autocast():
            orig = run_model(model, tokens, hidden_states=True)
            with splice_sae(blocks[layer], sae) as seen:
                spliced = run_model(model, tokens, hidden_states=True)
            with splice_sae(blocks[layer], lambda a: (torch.zeros_like(a), None)):
                zero = run_model(model, tokens)
        hs = [run.last_hidden_state.flatten(0, 1) for run in (orig, spliced, zero)]  # (B·T, D)
        targets = F.pad(tokens[:, 1:], (0, 1), value=-100).flatten()  # (B·T,): −100 at t = T−1
        for rows, (log_p_orig, log_p_sae, log_p_zero) in log_softmax_chunks(head, hs):
            ce += torch.stack([sum_rows(F.nll_loss(log_p, targets[rows], reduction="none"))
                               for log_p in (log_p_orig, log_p_sae, log_p_zero)])  # −100: none
            kl += torch.stack([sum_rows(F.kl_div(log_p, log_p_orig, log_target=True,
                                                 reduction="none").sum(-1))
                               for log_p in (log_p_sae, log_p_zero)])  # sae, zero
            agree += (log_p_orig.argmax(-1) == log_p_sae.argmax(-1)).sum()
        a, a_hat = seen.a.double(), seen.a_hat.double()
        fires += (seen.c > 0).sum((0, 1))  # (F,): on how many tokens each element fired
        sse += (a - a_hat).pow(2).sum()
        sum_sq_a += a.pow(2).sum()
        sum_a += a.sum((0, 1))  # (D,)
        for i, k in enumerate(after):  # (B, T, D) each, in the SAE's basis
            h_sae, h_orig = spliced.hidden_states[k].double(), orig.hidden_states[k].double()
            sse_ds[i] += (in_basis(h_sae, seen.center, a_hat) -
                          in_basis(h_orig, seen.center)).pow(2).sum()
    n_sequences = torch.tensor(len(eval_tokens), device=device)  # E
    if all_reduce:  # under torchrun: every process's sums
        all_reduce([ce, kl, agree, sse, sum_sq_a, sum_a, fires, sse_ds, n_sequences])
    n = int(n_sequences) * eval_tokens.shape[1]  # E·T positions
    n_predictions, n_elements = n - int(n_sequences), n * D  # E·(T−1), E·T·D
    (ce_orig, ce_sae, ce_zero), (kl_sae, kl_zero) = (ce / n_predictions).tolist(), (kl / n).tolist()
    return {
        "ce_loss_orig": ce_orig,
        "ce_loss_sae": ce_sae,
        "ce_loss_increase": ce_sae - ce_orig,
        "kl": kl_sae,
        "ce_loss_zero": ce_zero,
        "kl_zero": kl_zero,
        "ce_loss_score": ((ce[2] - ce[1]) / (ce[2] - ce[0])).item(),  # zero, sae, orig; 0/0: NaN
        "kl_score": ((kl[1] - kl[0]) / kl[1]).item(),  # (kl_zero − kl) / kl_zero
        "l0": fires.sum().item() / n,
        "alive_dict_elements": (fires > 0).sum().item(),
        "explained_variance": 1 - (sse / (sum_sq_a - sum_a.pow(2).sum() / n)).item(),  # Σ‖a − ā‖²
        "mse": sse.item() / n_elements,
        "top1_agreement": agree.item() / n,
        "downstream_mse": {k: x / n_elements for k, x in zip(after, sse_ds.tolist())},
        "n_eval_tokens": n,
    }


def format_metrics(m):
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
             if k != "downstream_mse"]
    ds = " ".join(f"{k}:{v:.3g}" for k, v in m["downstream_mse"].items())
    return " | ".join(parts + [f"downstream_mse {ds}"] * bool(ds))


# ==================================================================================================
# Engineering: what serves the method above, and is not part of it
# ==================================================================================================

# -----------------------------------------------------------------------------
# Models and data


@torch.no_grad()
def random_gpt2(config):
    """A GPT-2 with random weights, the same every time, fused attention (SDPA) and GELU. Biases are
    random too (GPT-2's init zeroes them): else a zeroed stream would give uniform logits."""
    config._attn_implementation = "sdpa"
    config.activation_function = "gelu_pytorch_tanh"  # GPT-2's gelu_new, fused (see load_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()  # as from_pretrained: no dropout
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, config.initializer_range)
        return model


def tiny_gpt2():
    """GPT-2 small's 12 blocks at width 64, vocabulary 512, weights 10× wider than GPT-2's init: the
    next-token entropy is ≈ 5.0 nats, not ln 512 = 6.2, so the KL has something to preserve."""
    return random_gpt2(transformers.GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=512,
                                               initializer_range=0.2, bos_token_id=511,
                                               eos_token_id=511))


RANDOM_MODELS = {"tiny": tiny_gpt2,
                 "gpt2-random": lambda: random_gpt2(transformers.GPT2Config())}  # GPT-2 small
OFFLINE = ("the Hugging Face hub is unreachable; offline, use --model tiny --dataset random, or a "
           "local model folder and dataset file")
FILES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def decoder_blocks(model):
    """The model's transformer blocks: GPT-2's transformer.h, GPT-NeoX's gpt_neox.layers, the
    model.layers of Llama, Mistral, Qwen, Gemma. Block L's input is HF's hidden_states[L]."""
    base = getattr(model, "base_model", model)
    blocks = getattr(base, "h", getattr(base, "layers", None))
    need(isinstance(blocks, nn.ModuleList), f"cannot find the decoder blocks of "
         f"{type(model).__name__} (supported: GPT-2, Llama/Mistral/Qwen/Gemma, GPT-NeoX)")
    return blocks


def hub_reachable():
    """Does the Hugging Face hub answer (through any proxy; never under HF_HUB_OFFLINE)?"""
    with suppress(Exception):  # any answer, an error too (the hub's client would retry for 25 s)
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=5)
        return True
    return False


def looks_like_path(name):
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).suffix in FILES


def load_model(name, device):
    """A frozen causal LM in eval mode and its tokenizer (or None). Weights are fp32 (autocast picks
    the compute dtype); attention is fused SDPA (no (T, T) matrix in memory); GELUs are fused."""
    model, tokenizer = RANDOM_MODELS[name]() if name in RANDOM_MODELS else None, None
    if model is None:
        # Not a folder (Config checked those) and no hub: a copy in the HF cache still loads.
        offline = not Path(name).expanduser().is_dir() and not hub_reachable()
        why = f"cannot download model {name!r}: {OFFLINE}" if offline else f"cannot load {name!r}"
        with explain(why):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, dtype=torch.float32, local_files_only=offline, attn_implementation="sdpa")
        with suppress(OSError, ValueError, TypeError):  # no tokenizer: fine for pre-tokenised data
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=offline)
    # transformers makes a tokenizer of special tokens alone from a bare config.json: none
    tokenizer = tokenizer if tokenizer and tokenizer("a", add_special_tokens=False).input_ids else None
    for module in model.modules():  # GPT-2's gelu_new: the tanh GELU in 8 kernels, and in
        for name, child in module.named_children():  # fp32 under CUDA autocast. The same formula,
            if isinstance(child, transformers.activations.NewGELUActivation):  # fused, in bf16:
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model.to(device).eval().requires_grad_(False), tokenizer


def read_rows(dataset):
    """An iterator over the dataset's rows (dicts), in their stored order; hub datasets stream."""
    path = Path(dataset).expanduser()
    with explain(f"cannot read dataset {dataset!r}"):  # datasets and pyarrow raise many kinds
        if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            yield from ds
            return
        if path.is_dir():
            files, builder = [str(f) for f in sorted(path.rglob("*.txt"))], "text"
            need(files, f"--dataset {dataset}: the folder holds no .txt files and no saved dataset")
        elif path.is_file():
            files, builder = [str(path)], FILES.get(path.suffix)
            need(path.stat().st_size, f"--dataset {dataset} is an empty file")
            need(builder, f"--dataset {dataset}: unknown file type (use {', '.join(FILES)})")
        else:
            need(not looks_like_path(dataset), f"--dataset {dataset}: no such file or folder")
            need(hub_reachable(), f"cannot stream dataset {dataset!r}: {OFFLINE}")
            files, builder = None, dataset  # streamed from the hub
        # A .txt file is one document: the EOS token goes between files, not between lines.
        documents = {"sample_by": "document"} if builder == "text" else {}
        yield from datasets.load_dataset(builder, data_files=files, split="train", streaming=True,
                                         **documents)


def sequences(cfg, tokenizer, vocab_size):
    """The dataset as a stream of (T,) token sequences. Rows with input_ids are cut to T tokens
    (shorter ones are skipped); text rows are tokenised and packed, EOS between; `random` gives
    uniform ids seeded with a constant, not --seed (every run has the same evaluation set). Ids are
    checked: on a GPU, one beyond the vocabulary would be an opaque device-side assert."""
    T, g, packed = cfg.n_ctx, torch.Generator().manual_seed(0), []
    for row in itertools.repeat({}) if cfg.dataset == "random" else read_rows(cfg.dataset):
        if not row:
            seqs = [torch.randint(vocab_size, (T,), generator=g)]
        elif "input_ids" in row:
            seqs = [torch.tensor(row["input_ids"][:T])] * (len(row["input_ids"]) >= T)
        else:
            need("text" in row,
                 f"dataset rows need an 'input_ids' or a 'text' column; these have {sorted(row)}")
            need(tokenizer and tokenizer.eos_token_id is not None,
                 "this dataset holds text, and the model has no tokenizer with an EOS token")
            packed += tokenizer(row["text"], add_special_tokens=False, verbose=False)["input_ids"]
            packed.append(tokenizer.eos_token_id)
            seqs = [torch.tensor(packed[i:i + T]) for i in range(0, len(packed) - T + 1, T)]
            del packed[:len(seqs) * T]
        for seq in seqs:  # (T,)
            need(seq.max() < vocab_size, f"the dataset has token id {seq.max()}, beyond the "
                 f"model's vocabulary of {vocab_size}")
            yield seq


def is_streamed(dataset):
    """Hub datasets (too big to hold) and `random` (endless) are streamed; local ones are held."""
    return dataset == "random" or not Path(dataset).expanduser().exists()


def shuffled(items, buffer_size, rng):
    """A shuffle buffer: reproducible for a given rng, and works on endless streams."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def load_data(cfg, tokenizer, vocab_size):
    """(eval_tokens (E, T), an endless iterator of training sequences (T,)). The first eval_samples
    sequences are the evaluation set; training reads the rest, in an order set by --seed: a local
    dataset is held and reshuffled each epoch; a streamed one is shuffled in a buffer, restarted."""
    stream = sequences(cfg, tokenizer, vocab_size)
    eval_seqs = list(itertools.islice(stream, cfg.eval_samples))
    need(len(eval_seqs) == cfg.eval_samples, f"--dataset {cfg.dataset} holds only {len(eval_seqs)} "
         f"sequences of {cfg.n_ctx} tokens, fewer than --eval-samples {cfg.eval_samples}")

    def training():
        rest, rng, g = stream, random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
        held = None if is_streamed(cfg.dataset) else list(rest)
        if held and cfg.n_samples > len(held):
            print0(f"--n-samples {cfg.n_samples:,} makes {cfg.n_samples / len(held):,.1f} passes "
                   f"over the {len(held):,} training sequences of --dataset {cfg.dataset}")
        while True:
            n = 0
            for n, seq in enumerate(shuffled(rest, cfg.shuffle_buffer, rng) if held is None else
                                    (held[i] for i in torch.randperm(len(held), generator=g)), 1):
                yield seq
            need(n, f"--dataset {cfg.dataset} has no sequences left for training after the "
                    f"{cfg.eval_samples} evaluation sequences")
            rest = itertools.islice(sequences(cfg, tokenizer, vocab_size), cfg.eval_samples, None)

    return torch.stack(eval_seqs), training()


# -----------------------------------------------------------------------------
# Many processes. `torchrun --nproc_per_node=8 e2e_sae.py ...` starts 8 copies of this file, each
# told its RANK, LOCAL_RANK (its GPU) and the WORLD_SIZE. Each micro-batch is split WORLD_SIZE ways,
# DDP averages the SAE's gradients, all_reduce adds up the logged terms and the evaluation sums, and
# rank 0 alone prints and writes. A plain `python e2e_sae.py` is rank 0 of 1.

TORCHRUN = all(v in os.environ for v in "RANK LOCAL_RANK WORLD_SIZE".split())
RANK, WORLD_SIZE = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE")) if TORCHRUN else (0, 1)
MAIN_PROCESS = RANK == 0


def print0(*args, **kwargs):
    if MAIN_PROCESS:
        print(*args, **kwargs)


def process_device(cfg):
    """--device, checked; under torchrun "cuda" is LOCAL_RANK's GPU, and it joins the others."""
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if TORCHRUN and cuda:
        need(device.index is None or WORLD_SIZE == 1, f"--device {cfg.device}: under torchrun each "
             "process takes the GPU of its LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", device.index or int(os.environ["LOCAL_RANK"]))
    with explain(f"--device {device} is not usable here"):
        torch.empty(0, device=device)
    if TORCHRUN and not dist.is_initialized():
        if cuda:  # and device_id: NCCL's barriers know this process's GPU (else they warn)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def all_reduce(tensors):
    """Sums each tensor over the processes, in place, in one float64 collective (exact counts)."""
    if dist.is_initialized():
        flat = torch.cat([t.double().flatten() for t in tensors])
        dist.all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return tensors


# -----------------------------------------------------------------------------
# Saved SAEs (this file's, SAELens's, the paper's library's), the output folder and checkpoints


def save_sae(sae, path):
    """sae.safetensors, laid out so that â = relu(a @ W_enc + b_enc) @ W_dec + b_dec."""
    tensors = {"W_enc": sae.encoder.weight.T,  # (D, F)
               "b_enc": sae.encoder.bias,  # (F,)
               "W_dec": sae.dictionary.T,  # (F, D): one unit-norm row per dictionary element
               "b_dec": sae.decoder.bias}  # (D,)
    atomic_write(path, safetensors.torch.save({k: v.detach().float().cpu().contiguous()
                                               for k, v in tensors.items()}))


def load_sae(folder):
    """(the SAE saved in folder, see read_sae(), and its run's Config from config.json, or None)."""
    state, stated = read_sae(folder)
    with explain(f"{folder} does not hold a valid SAE"):
        sae = SAE(*state["encoder.weight"].T.shape, center=stated.get("center", True))
        sae.load_state_dict(state)
    return sae, Config(**config) if (config := read_config(folder)) else None


def read_sae(path):
    """(state dict, stated Config fields) of an SAE: our folder, SAELens's, or the paper's .pt."""
    path = Path(path)
    path = path.parent if path.name == "sae.safetensors" else path  # the file stands for its folder
    file = path / "sae.safetensors"
    if path.suffix == ".pt":
        return read_paper_checkpoint(path)
    if (path / "cfg.json").is_file() and not file.exists():
        return read_saelens(path)
    need(file.is_file(), f"{path} holds no sae.safetensors (nor SAELens's cfg.json), and is not a "
         ".pt checkpoint of the paper's library" if path.exists() else f"{path}: no such folder")
    with explain(f"{file} is not a valid SAE file"):
        t = safetensors.torch.load_file(file)  # laid out as save_sae() says
        D, F_ = t["W_enc"].shape
        shapes = [tuple(t[k].shape) for k in "b_enc W_dec b_dec".split()]
        need(shapes == [(F_,), (F_, D), (D,)], f"{file}: b_enc, W_dec, b_dec have shapes {shapes}, "
             f"expected {[(F_,), (F_, D), (D,)]} (W_enc's is {(D, F_)})")
        state = {"encoder.weight": t["W_enc"].T, "encoder.bias": t["b_enc"],
                 "decoder.weight": t["W_dec"].T, "decoder.bias": t["b_dec"]}
    return state, read_config(path)


def fold(W_enc, b_enc, W_dec, b_dec, scale=1.0, pre_bias=False):
    """This file's SAE (its state dict) from one with decoder rows W_i of any norm that computes
    f = ReLU((s·a − p) W_enc + b_enc), â = (f W_dec + b_dec) / s, with s = scale and p = b_dec if
    pre_bias else 0. Each fold is exact:
      ReLU((s·a − p) W_enc + b_enc) = ReLU(a (s·W_enc) + (b_enc − p W_enc))     s, p → the encoder
      (f W_dec + b_dec) / s = f (W_dec / s) + b_dec / s                          s → the decoder
      f_i W_i/s = (n_i f_i)(W_i/‖W_i‖) with n_i = ‖W_i‖/s, and n_i f_i = ReLU(n_i · pre_i), as ReLU
      is positively homogeneous: n → the encoder. Same â; c = n·f (where n_i > 0, the same fire)."""
    n = W_dec.norm(dim=1) / scale  # (F,)
    return {"encoder.weight": (scale * W_enc * n).T,  # (F, D)
            "encoder.bias": (b_enc - pre_bias * b_dec @ W_enc) * n,  # (F,)
            "decoder.weight": F.normalize(W_dec, dim=1).T,  # (D, F): unit columns
            "decoder.bias": b_dec / scale}  # (D,)


def read_saelens(path):
    """A SAELens folder's standard SAE, folded (p: apply_b_dec_to_input; s: activation_scaler.json).
    Uncentred unless model_from_pretrained_kwargs says center_writing_weights (or before 3.19.2)."""
    with explain(f"{path / 'cfg.json'} is not a readable SAELens configuration"):
        cfg = json.loads((path / "cfg.json").read_text())
        meta = {**cfg, **(cfg.get("metadata") or {})}  # SAELens 6 keeps the run's facts apart
        hook = meta.get("hook_name", meta.get("hook_point"))  # hook_point: before SAELens 3
        kwargs = meta.get("model_from_pretrained_kwargs")  # None: before 3.19.2, which centred
        centred = kwargs is None or kwargs.get("center_writing_weights") is True
        kind = (f"{meta.get('architecture', 'standard')} SAE "
                f"({meta.get('activation_fn_str', meta.get('activation_fn', 'relu'))})")
    need(kind == "standard SAE (relu)", f"{path} holds a SAELens {kind}, which this file's SAE "
         "cannot represent (it reads standard ReLU SAEs, not TopK, JumpReLU, gated, transcoders)")
    layer = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", str(hook))
    need(layer, f"{path} holds an SAE of {hook}, not of blocks.L.hook_resid_pre")
    norm, scaler = meta.get("normalize_activations") or "none", path / "activation_scaler.json"
    need(norm == "none" or norm == "expected_average_only_in" and scaler.is_file(),
         f"{path} normalises its input by {norm!r} without its factor in activation_scaler.json")
    need((path / "sae_weights.safetensors").is_file(), f"{path} has no sae_weights.safetensors")
    with explain(f"{path} is not a valid SAELens standard SAE"):
        scale = json.loads(scaler.read_text())["scaling_factor"] if norm != "none" else 1.0
        need(scale > 0, f"{scaler}'s scaling factor {scale} is not positive")
        t = safetensors.torch.load_file(path / "sae_weights.safetensors")
        state = fold(**{k: v.float() for k, v in t.items()}, scale=scale,
                     pre_bias=meta.get("apply_b_dec_to_input", True))
    return state, {"layer": int(layer[1]), "center": centred,
                   "model": meta.get("model_name") or Config.model}


def read_paper_checkpoint(path):
    """A .pt of the paper's library: its SAEs' state dict (of one SAE, this file's, under keys such
    as blocks-6-hook_resid_pre.encoder.0.weight), in TransformerLens's default (centred) basis."""
    with explain(f"{path} is not a checkpoint of the paper's library"):
        saved = torch.load(path, map_location="cpu", weights_only=True)  # runs no code
        hooks = {k.split(".")[0] for k in saved}  # e.g. blocks-6-hook_resid_pre
        state = {k.partition(".")[2].replace(".0.", "."): v.float() for k, v in saved.items()}
    layer = re.fullmatch(r"blocks-(\d+)-hook_resid_pre", hooks.pop() if len(hooks) == 1 else "")
    keys = set("encoder.weight encoder.bias decoder.weight decoder.bias".split())  # as SAE's
    need(layer and state.keys() == keys,
         f"{path} holds {', '.join(sorted(saved)[:4])}…, not one SAE of the paper's library")
    return state, {"layer": int(layer[1]), "center": True}


RUN_FILES = ("config.json log.jsonl sae.safetensors metrics.json checkpoint.pt cfg.json "
             "sae_weights.safetensors").split()


def atomic_write(path, data):
    """data (bytes or str) into a new file beside path, then renamed over it: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with explain(f"cannot write {path}; the previous version, if any, is intact"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a power cut leaves no empty file
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_json(path, obj):
    atomic_write(path, f"{json.dumps(obj, indent=2)}\n")


def read_config(folder):
    """The Config fields of folder/config.json, or {} (uncentred if it predates `center`)."""
    path = Path(folder) / "config.json"
    with explain(f"{path} is not a readable run configuration"):
        saved = {"center": False, **json.loads(path.read_text())} if path.exists() else {}
        return {k: v for k, v in saved.items() if k in {f.name for f in fields(Config)}}


def read_log(path):
    """The records of a log.jsonl (a line cut short by a crash is dropped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with suppress(ValueError):
            records.append(json.loads(line))
    return records


def check_out_dir(cfg):
    """Refuse to start a run over another one (finished or not), unless --overwrite says so."""
    out = Path(cfg.out_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    resume = (f", --resume {out} to continue it, or another --out-dir" if "checkpoint.pt" in found
              else ", or another --out-dir (with no checkpoint.pt, there is nothing to --resume)")
    need(not found or cfg.overwrite or cfg.resume, f"{out} already holds "
         f"{'a finished' if 'metrics.json' in found else 'an unfinished'} run ({', '.join(found)})"
         f": pass --overwrite to replace it{resume}")
    need(not cfg.init_from or out.resolve() != Path(cfg.init_from).resolve(), "--out-dir is the "
         "folder of the SAE in --init-from, which the run would overwrite: pass another --out-dir")


def open_out_dir(cfg, run_info, step):
    """The output folder with config.json, and log.jsonl up to `step`, open for appending."""
    out = Path(cfg.out_dir)
    if cfg.overwrite and out.is_dir():  # the last three describe the SAE being replaced:
        for name in RUN_FILES + "eval.json inspect.json compare.json".split():
            (out / name).unlink(missing_ok=True)
    write_json(out / "config.json", run_info)
    log = read_log(out / "log.jsonl")
    atomic_write(out / "log.jsonl", "".join(f"{json.dumps(r)}\n" for r in log if r["step"] <= step))
    return open(out / "log.jsonl", "a")


def save_checkpoint(out, run, step, train_seconds, eval_due=False):
    """checkpoint.pt (rank 0 writes, all wait): what makes a resumed run end as the run left alone:
    the SAE, Adam, the RNG, the step (the data position) and whether its evaluation is to come."""
    if MAIN_PROCESS:
        buffer = io.BytesIO()
        torch.save({"step": step, "train_seconds": train_seconds, "eval_due": eval_due,
                    "rng": torch.get_rng_state(), "sae": run.sae.state_dict(),
                    "optimizer": run.optimizer.state_dict()}, buffer)
        atomic_write(out / "checkpoint.pt", buffer.getbuffer())
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(out, run):
    """Restores the SAE, Adam and the RNG from out/checkpoint.pt (parse_config checked that it is
    there), and returns the rest. Loading runs no code from the file: weights_only."""
    path = out / "checkpoint.pt"
    with explain(f"{path} is not a valid checkpoint for this run"):
        state = torch.load(path, map_location="cpu", weights_only=True)  # then to the run's device
        run.sae.load_state_dict(state.pop("sae"))
        run.optimizer.load_state_dict(state.pop("optimizer"))
        torch.set_rng_state(state.pop("rng"))
    return state


def save_saelens(out, run_info):
    """cfg.json and sae_weights.safetensors, so that SAELens's `SAE.load_from_disk(folder)` reads
    any output folder (version 6, "standard": relu(x @ W_enc + b_enc) @ W_dec + b_dec). Its weights
    are a hard link to sae.safetensors, which names and lays out the tensors the same way."""
    meta = {"sae_lens_version": "6.0.0", "model_name": run_info["model"], "hook_head_index": None,
            "hook_name": f"blocks.{run_info['layer']}.hook_resid_pre", "prepend_bos": False,
            "context_size": run_info["n_ctx"], "dataset_path": run_info["dataset"],
            # TransformerLens's hook_resid_pre is the centred stream with center_writing_weights,
            # Hugging Face's without (SAELens passes these to from_pretrained_no_processing).
            "model_from_pretrained_kwargs": {"center_writing_weights": run_info["center"]}}
    write_json(out / "cfg.json", {
        "architecture": "standard", "d_in": run_info["d_model"], "d_sae": run_info["dict_size"],
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "metadata": meta,
        "normalize_activations": "none", "reshape_activations": "none",
        "sae_lens_version": "6.0.0"})  # some 6.x releases read it here, others in the metadata
    weights = out / "sae_weights.safetensors"
    weights.unlink(missing_ok=True)
    try:
        os.link(out / "sae.safetensors", weights)
    except OSError:  # a filesystem without hard links
        atomic_write(weights, (out / "sae.safetensors").read_bytes())


# -----------------------------------------------------------------------------
# Training


def setup(cfg, sae=None):
    """What training, --benchmark, --eval-only and --inspect share: device and precision, the frozen
    model, its blocks, the SAE (new, seeded by --seed, unless given), Adam, DDP under torchrun."""
    device = process_device(cfg)
    # TF32 for the fp32 matmuls of a bf16 run; --dtype fp32 is fp32 throughout, as the paper ran.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.dtype == "bf16"
    model, tokenizer = load_model(cfg.model, device)
    blocks, D = decoder_blocks(model), model.config.hidden_size
    # TransformerLens centres LayerNorm models only: cfg.center (and config.json) says the basis.
    cfg.center = cfg.center and any(isinstance(m, nn.LayerNorm) for m in model.modules())
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    need(cfg.layer < len(blocks),
         f"--layer {cfg.layer} is outside the model's blocks 0 … {len(blocks) - 1}")
    need(cfg.loss != "e2e_ds" or cfg.layer < len(blocks) - 1 or cfg.eval_only or cfg.inspect,
         f"--loss e2e_ds needs a block after --layer; {cfg.layer} is the model's last")
    need(max_ctx is None or cfg.n_ctx <= max_ctx,
         f"--n-ctx {cfg.n_ctx} is longer than the model's context of {max_ctx} tokens")
    need(not getattr(model.config, "final_logit_softcapping", None),
         f"{cfg.model} soft-caps its logits, which unembed() does not model")
    need(cfg.batch_size % WORLD_SIZE == 0,
         f"--batch-size {cfg.batch_size} does not split evenly over {WORLD_SIZE} processes")
    if sae is None and cfg.init_from and not cfg.resume:  # fine-tuning a saved SAE
        sae = load_sae(cfg.init_from)[0]
        cfg.dict_ratio = sae.encoder.out_features / D  # as config.json and a resume need it
    elif sae is None:
        need(round(cfg.dict_ratio * D),
             f"--dict-ratio {cfg.dict_ratio} × width {D} leaves no dictionary element")
        torch.manual_seed(cfg.seed)  # the SAE's initialisation
        sae = SAE(D, round(cfg.dict_ratio * D))
    need(sae.encoder.in_features == D, f"the SAE in {cfg.sae or cfg.init_from} reads width "
         f"{sae.encoder.in_features}, but {cfg.model} has {D}")
    sae = sae.to(device)
    sae.center = cfg.center
    if cfg.compile:
        # Compiled forward()s; the hooks run in __call__, outside them. A debugger steps into it.
        for module in [sae, *blocks]:  # dynamic: a smaller last batch (not of 1) adds no graph
            module.forward = torch.compile(module.forward, dynamic=True)
    return SimpleNamespace(
        device=device, model=model, tokenizer=tokenizer, blocks=blocks, sae=sae,
        step_sae=DDP(sae) if dist.is_initialized() else sae,
        optimizer=torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=device.type == "cuda"),
        batch_size=cfg.batch_size // WORLD_SIZE,  # this process's share of each micro-batch
        autocast=partial(torch.autocast, device.type, torch.bfloat16, enabled=cfg.dtype == "bf16"),
        flops=flops_per_token(model, blocks, sae, cfg.loss, cfg.layer, cfg.n_ctx),
        peak=peak_flops(device, cfg.dtype))


def lr_factor(step, warmup_steps, total_steps, min_ratio):
    """The learning rate of step 0 … total_steps−1 as a fraction of --lr: a linear warm-up to 1,
    then a cosine decay that reaches min_ratio at the last step."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 2))  # so that a short run still decays
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(cfg, run, micro_batches):
    """One optimiser step on micro-batches (B, T) → this process's loss terms, L0 and the gradient
    norm before clipping, averaged: tensors on the device; nothing waits for the GPU here."""
    terms = {}
    for i, tokens in enumerate(micro_batches):
        if isinstance(run.step_sae, DDP):  # DDP averages the gradients after the last micro-batch
            run.step_sae.require_backward_grad_sync = i == len(micro_batches) - 1
        with run.autocast():
            loss, loss_terms, c = compute_loss(cfg, run.model, run.blocks, run.step_sae, tokens)
        (loss / len(micro_batches)).backward()
        l0 = (c > 0).sum(-1).float().mean()  # counts per token first: no fp32 copy of the mask
        del c  # (B, T, F): not kept alive through the next micro-batch
        for k, v in {"loss": loss, **loss_terms, "l0": l0}.items():
            terms[k] = terms.get(k, 0.0) + v.detach() / len(micro_batches)
    terms["grad_norm"] = nn.utils.clip_grad_norm_(run.sae.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad()  # gradients to None
    return terms


def read_window(run, window, signalled, last_saved):
    """The window's terms averaged over steps and processes, and whether any process got a signal:
    the one wait for the GPU. A non-finite term stops the run before anything of it is written."""
    keys = list(window[0])
    sums = [sum(terms[k] for terms in window) / len(window) for k in keys]
    values = all_reduce([torch.stack([*sums, torch.tensor(float(signalled), device=run.device)])])
    *means, stop = (v / WORLD_SIZE for v in values[0].tolist())  # all processes' means
    need(all(map(math.isfinite, means)), "the loss or its gradient is not finite "
         f"({', '.join(f'{k} {v:.4g}' for k, v in zip(keys, means))}); nothing after step "
         f"{last_saved} was written, so any checkpoint in --out-dir is intact, but resuming would "
         "repeat the same steps: start again with a lower --lr (and --overwrite)")
    return dict(zip(keys, means)), stop > 0


class StopSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM (pre-emption) only set .signum: the loop finishes
    its step and writes a checkpoint. In a plain run a second signal acts as usual; torchrun passes
    signals to every process, so there the handler stays and --shutdown-timeout is the hard stop."""

    def __enter__(self):
        self.signum = None
        self.old = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handler(self, signum, frame):
        if self.signum is None:
            print0(f"\n{signal.Signals(signum).name}: finishing the step, then writing a "
                   "checkpoint", file=sys.stderr)
        self.signum = signum
        if not TORCHRUN:
            self.__exit__()

    def __exit__(self, *exc):
        for s, old in self.old.items():
            signal.signal(s, old)


class Interrupted(Exception):
    """A run stopped by a signal, its checkpoint written. args: (the signal number, a message)."""


def due(every, step, cfg):
    """Did optimiser step `step` (from 1) pass a multiple of `every` training sequences? The last
    step is never due: the final evaluation and checkpoint come after the loop."""
    S = cfg.samples_per_step
    return every > 0 and step < cfg.n_samples // S and step * S % every < S


def train(cfg):
    """Train an SAE as cfg says (or continue the run in cfg.resume), write the output folder, and
    return the final metrics. Under torchrun every process runs this; rank 0 alone writes."""
    out, S = Path(cfg.out_dir), cfg.samples_per_step  # S: sequences per optimiser step
    n_steps = cfg.n_samples // S
    if cfg.resume and (out / "metrics.json").exists() and not (out / "checkpoint.pt").exists():
        print0(f"{out} holds a finished run: nothing to resume")
        return json.loads((out / "metrics.json").read_text())
    check_out_dir(cfg)
    run = setup(cfg)
    state = load_checkpoint(out, run) if cfg.resume else dict(step=0, train_seconds=0.0, eval_due=0)
    start, train_seconds = state["step"], state["train_seconds"]
    if cfg.resume:  # the first line printed (a library's progress bar may come before, on stderr)
        need(start <= n_steps,
             f"--n-samples {cfg.n_samples} is less than the {start * S} sequences trained on")
        print0(f"resuming the run in {out} at step {start} of {n_steps}, on the learning-rate "
               f"schedule of --n-samples {cfg.n_samples}")
    eval_tokens, train_seqs = load_data(cfg, run.tokenizer, run.model.config.vocab_size)
    # A resumed run skips what it read (same --seed, same order); one read now fails early, untimed.
    train_seqs = itertools.islice(train_seqs, start * S, None)
    train_seqs = itertools.chain([next(train_seqs)], train_seqs)
    run_info = {**asdict(cfg), "d_model": run.model.config.hidden_size, "n_layers": len(run.blocks),
                "dict_size": run.sae.encoder.out_features, "n_processes": WORLD_SIZE}
    log_file = open_out_dir(cfg, run_info, start) if MAIN_PROCESS else None
    if state["eval_due"]:  # the run stopped just before this evaluation
        evaluate_and_log(cfg, run, eval_tokens, log_file, start)
    processes = f" | {WORLD_SIZE} processes of {run.batch_size} sequences per micro-batch"
    print0(f"{cfg.loss} SAE at layer {cfg.layer} of {cfg.model} ({'un' * (not cfg.center)}centred "
           f"stream): D={run_info['d_model']} F={run_info['dict_size']} λ={cfg.sparsity_coeff:g}"
           f"{f' β={cfg.downstream_coeff:g}' * (cfg.loss == 'e2e_ds')} | {n_steps} steps of {S} × "
           f"{cfg.n_ctx} tokens | {run.device} {cfg.dtype}{processes * TORCHRUN} → {out}")
    def next_step():  # this process's share of the next step's sequences
        seqs = torch.stack([next(train_seqs) for _ in range(S)]).view(cfg.grad_accum, -1, cfg.n_ctx)
        seqs = seqs.tensor_split(WORLD_SIZE, 1)[RANK]  # (grad_accum, B / WORLD_SIZE, T)
        return seqs.pin_memory() if run.device.type == "cuda" else seqs

    bar = tqdm(range(start, n_steps), "train", n_steps, initial=start, disable=not MAIN_PROCESS)
    window, t0, saved = [], time.perf_counter(), start  # the steps since the last log line, ...
    with StopSignal() as stop, ThreadPoolExecutor(1) as reader:
        batches = reader.submit(next_step)  # the next step's sequences, read while the GPU works
        for step in bar:
            run.optimizer.param_groups[0]["lr"] = cfg.lr * lr_factor(
                step, cfg.warmup_samples // S, n_steps, cfg.lr_min_ratio)
            tokens = batches.result().to(run.device, non_blocking=True)  # from pinned memory
            batches = reader.submit(next_step) if step + 1 < n_steps else None
            window.append(train_step(cfg, run, list(tokens)))
            # ---- diagnostics: log, stop on a signal, evaluate, checkpoint ------------------------
            done = step + 1
            log = done % cfg.log_every == 0 or done == n_steps
            evaluating, saving = due(cfg.eval_every, done, cfg), due(cfg.save_every, done, cfg)
            if not (log or evaluating or saving or not TORCHRUN and stop.signum is not None):
                continue  # a step that neither logs nor waits for the GPU
            terms, stopping = read_window(run, window, stop.signum is not None, saved)
            t_pause = time.perf_counter()
            if log:
                train_seconds += t_pause - t0
                record = train_record(cfg, run, terms, len(window), t_pause - t0)
                log_line(log_file, cfg, done, record)
                bar.set_postfix_str(" ".join(f"{k.removeprefix('train/')} {v:.3g}"
                                             for k, v in record.items()))
                window, t0 = [], t_pause
            if stopping:
                save_checkpoint(out, run, done, train_seconds, evaluating)
                name = signal.Signals(stop.signum).name if stop.signum else "a signal to a process"
                raise Interrupted(stop.signum or signal.SIGTERM, f"{name} after step {done} of "
                                  f"{n_steps}: checkpoint written to {out}; continue with: "
                                  f"python e2e_sae.py --resume {out}")
            if evaluating:
                evaluate_and_log(cfg, run, eval_tokens, log_file, done)
            if saving:
                save_checkpoint(out, run, done, train_seconds)
                saved = done
            t0 += time.perf_counter() - t_pause  # evaluations and checkpoints are not training time
    if start < n_steps:  # the final evaluation can take minutes: a run stopped in it resumes here
        save_checkpoint(out, run, n_steps, train_seconds)
    metrics = evaluate_and_log(cfg, run, eval_tokens, log_file, n_steps, final=True)
    if MAIN_PROCESS:
        finish_out_dir(out, run, metrics, run_info, train_seconds, n_steps * S * cfg.n_ctx)
    return metrics


def train_record(cfg, run, terms, n_steps, seconds):
    """A training line of log.jsonl: the terms of the last n_steps steps, averaged (read_window),
    the learning rate, tokens/s, and on a GPU of known peak the model FLOP utilisation."""
    record = {f"train/{k}": v for k, v in terms.items()}
    record["train/lr"] = run.optimizer.param_groups[0]["lr"]
    record["tokens_per_s"] = tokens_per_s = n_steps * cfg.samples_per_step * cfg.n_ctx / seconds
    if run.peak:  # the FLOPs the method needs per second, over the GPUs' peak
        record["mfu"] = tokens_per_s * run.flops / run.peak
    return record


def log_line(log_file, cfg, step, record):
    if log_file:  # rank 0's
        record = {"step": step, "samples": step * cfg.samples_per_step, **record}
        log_file.write(f"{json.dumps(record)}\n")
        log_file.flush()


def evaluate_and_log(cfg, run, eval_tokens, log_file, step, final=False):
    """evaluate(), logged as eval/… at `step`, and printed unless final (train() prints that)."""
    share = eval_tokens.tensor_split(WORLD_SIZE)[RANK]  # this process's (≈E / WORLD_SIZE, T)
    metrics = evaluate(run.model, run.blocks, run.sae, share, cfg.layer, run.batch_size,
                       run.autocast, all_reduce)
    log_line(log_file, cfg, step, {f"eval/{k}": v for k, v in metrics.items()})
    if not final and MAIN_PROCESS:
        tqdm.write(f"eval @ {step * cfg.samples_per_step} samples: {format_metrics(metrics)}")
    return metrics


def finish_out_dir(out, run, metrics, run_info, train_seconds, n_tokens):
    """The finished run's files; the checkpoint goes, since sae.safetensors now holds the SAE."""
    save_sae(run.sae, out / "sae.safetensors")
    save_saelens(out, run_info)
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    tokens_per_s = n_tokens / train_seconds  # over all sessions of a resumed run
    mfu = f", MFU {tokens_per_s * run.flops / run.peak:.1%}" if run.peak else ""
    print(f"trained on {n_tokens:,} tokens in {train_seconds:.1f} s ({tokens_per_s:,.0f} tokens/s"
          f"{mfu}, evaluation excluded)")
    print(f"final: {format_metrics(metrics)}")
    if run.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB")
    print(f"wrote {out}/sae.safetensors, config.json, metrics.json, log.jsonl "
          "(and SAELens's cfg.json, sae_weights.safetensors)")


def evaluate_saved(cfg):
    """--eval-only: evaluate the SAE in cfg.sae, and write eval.json into cfg.out_dir."""
    run = setup(cfg, load_sae(cfg.sae)[0])
    eval_tokens = load_data(cfg, run.tokenizer, run.model.config.vocab_size)[0]
    metrics = evaluate_and_log(cfg, run, eval_tokens, None, 0, final=True)
    print0(f"{cfg.sae} at layer {cfg.layer} of {cfg.model}: {format_metrics(metrics)}")
    if MAIN_PROCESS:
        write_output(cfg, "eval.json", metrics)
    return metrics


# -----------------------------------------------------------------------------
# Measuring speed


def flops_per_token(model, blocks, sae, loss, layer, n_ctx):
    """Matrix-multiply FLOPs of one training token (2 per multiply-add), from the shapes, for the
    work compute_loss does; elementwise work (norms, softmax, GELU) is left out, as is usual for
    MFU. Per token, with P the weights of one block's matmuls, n blocks, and T = n_ctx:
      block forward      2P + 4TD    (4TD: QKᵀ and the attention-weighted sum over all T keys; the
                                      full square, not the causal half, as PaLM's MFU counts it)
      block backward     2P + 8TD    (input gradients only: the model is frozen)
      unembedding        2DV
      SAE                4DF + 6DF   (forward: encoder and decoder; backward: W_e's gradient, and
                                      the decoder's for c and for D_n; a is a constant)
      local    L blocks forward, the SAE
      e2e(ds)  the clean run (n blocks); the spliced run (n blocks, and the backward of the n − L
               from block L on); the SAE; three unembeddings in unembed_kl (both runs' logits, and
               the gradient (q − p) W_U). The downstream MSE adds no matmul."""
    (dict_size, D), n, V = sae.encoder.weight.shape, len(blocks), model.config.vocab_size
    P = sum(p.numel() for p in blocks[0].parameters() if p.ndim == 2)
    block_fwd, block_bwd = 2 * P + 4 * n_ctx * D, 2 * P + 8 * n_ctx * D
    sae_flops = 10 * D * dict_size
    if loss == "local":
        return layer * block_fwd + sae_flops
    return 2 * n * block_fwd + (n - layer) * block_bwd + 3 * 2 * D * V + sae_flops


# Dense bf16 peak FLOP/s (data sheets), for MFU. The first key in the device name wins: GB200 first.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H800 PCIe": 756e12,
                   "H800": 989e12, "GH200": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "GB200": 2500e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L40": 181e12, "L4": 121e12}


def peak_flops(device, dtype):
    """The bf16 peak FLOP/s of all the run's GPUs, or None (CPU, fp32, a GPU not in the table)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and dtype == "bf16" else ""
    return next((peak * WORLD_SIZE for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def benchmark(cfg):
    """--benchmark: optimiser steps exactly as train() takes them, on random tokens. Prints and
    returns tokens/s, FLOPs per token, achieved FLOP/s, MFU (on a GPU of known peak), memory."""
    run, cuda = setup(cfg), cfg.device.startswith("cuda")
    g = torch.Generator().manual_seed(cfg.seed + RANK)
    print0(f"benchmark: {cfg.loss} at layer {cfg.layer} of {cfg.model} (D="
           f"{run.sae.encoder.in_features}, F={run.sae.encoder.out_features}) | {cfg.grad_accum} × "
           f"{cfg.batch_size} × {cfg.n_ctx} tokens per step | {run.device} {cfg.dtype}"
           f"{' compiled' * cfg.compile} | {cfg.bench_warmup} warm-up + {cfg.bench_steps} timed "
           f"steps{f' | {WORLD_SIZE} processes' * TORCHRUN}")
    for i in range(cfg.bench_warmup + cfg.bench_steps):
        if i == cfg.bench_warmup:  # compilation, the allocator's pools and kernel choices are done
            if cuda:  # the GPU runs ahead of Python: wait for it; from now on Adam's moments exist
                torch.cuda.synchronize(run.device)
                torch.cuda.reset_peak_memory_stats(run.device)
            t0 = time.perf_counter()
        shape = (cfg.grad_accum, run.batch_size, cfg.n_ctx)  # micro-batches of (B / WORLD_SIZE, T)
        tokens = torch.randint(run.model.config.vocab_size, shape, generator=g)
        train_step(cfg, run, list(tokens.to(run.device)))
    if cuda:
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    tokens_per_s = cfg.bench_steps * cfg.samples_per_step * cfg.n_ctx / seconds  # all processes'
    memory = torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved
    allocated, reserved = (f(run.device) / 2**30 if cuda else None for f in memory)  # GiB
    result = {"tokens_per_s": tokens_per_s, "step_s": seconds / cfg.bench_steps,
              "flops_per_token": run.flops, "tflops_per_s": tokens_per_s * run.flops / 1e12,
              "peak_memory_gib": allocated, "peak_reserved_gib": reserved,
              "mfu": run.peak and tokens_per_s * run.flops / run.peak}
    print0(f"tokens/s {tokens_per_s:,.0f} | {result['step_s'] * 1e3:.1f} ms per step | "
           f"{run.flops / 1e9:.3f} GFLOP per token (see flops_per_token) → "
           f"{result['tflops_per_s']:.2f} TFLOP/s")
    print0(f"MFU {result['mfu']:.1%} of {run.peak / 1e12:.0f} TFLOP/s ({WORLD_SIZE} × the bf16 "
           f"peak of {torch.cuda.get_device_name(run.device)})" if run.peak else
           "MFU: n/a (needs a GPU of known bf16 peak, see PEAK_BF16_FLOPS, and --dtype bf16)")
    print0(f"peak GPU memory {allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved by "
           f"PyTorch's allocator (timed steps{', rank 0' * TORCHRUN})" if cuda else
           "peak GPU memory: n/a on the CPU")
    return result


# -----------------------------------------------------------------------------
# Looking inside: feature contexts, feature density, dictionary geometry

TOP_CONTEXTS, CONTEXT_TOKENS = 5, 8  # --inspect: contexts per element; tokens each side of the max


def text_histogram(edges, counts, label):
    """A line per bin (label: the format of its edges), from the first non-empty one to the last."""
    full = [i for i, n in enumerate(counts) if n] or [0]
    bar = lambda n: "█" * round(40 * n / max(counts + [1]))  # scaled to the largest
    return "\n".join(f"  {label.format(*edges[i:i + 2]):>18} {bar(counts[i]):<40} {counts[i]}"
                     for i in range(full[0], full[-1] + 1))


def density(fires, n_tokens):
    """Histogram of log10 firing frequency over the dictionary (F,), in bins of 0.5 from
    log10(1/n_tokens), the rarest possible, up to 0; elements that never fired are counted dead."""
    lowest = math.floor(2 * math.log10(1 / n_tokens)) / 2
    edges = torch.arange(lowest, 0.25, 0.5, dtype=torch.float64)
    log_freq = (fires[fires > 0].double() / n_tokens).log10()
    counts = torch.histogram(log_freq, edges).hist.long().tolist() if len(edges) > 1 else []
    return {"log10_freq_edges": edges.tolist(), "counts": counts, "dead": int((fires == 0).sum())}


@torch.no_grad()
def inspect(cfg):
    """--inspect: the SAE in cfg.sae over the dataset's first N sequences, keeping for each element
    a running top-TOP_CONTEXTS of its largest activation per sequence and where: (TOP_CONTEXTS + B)
    × F × 2 numbers, whatever N is; a second pass takes CONTEXT_TOKENS each side. Prints elements'
    frequency, mean activation, top contexts («marked») and density; writes inspect.json."""
    sae, k, W, T = load_sae(cfg.sae)[0], TOP_CONTEXTS, CONTEXT_TOKENS, cfg.n_ctx
    F_, n = sae.encoder.out_features, cfg.inspect_samples or cfg.eval_samples
    with explain(f"--features takes comma-separated numbers, not {cfg.features!r}"):
        chosen = [int(f) for f in cfg.features.split(",")] if cfg.features is not None else None
    need(all(0 <= f < F_ for f in chosen or []),
         f"--features {cfg.features}: the dictionary has elements 0 … {F_ - 1}")
    run = setup(cfg, sae)
    vocab_size = run.model.config.vocab_size
    first_n = lambda: itertools.islice(sequences(cfg, run.tokenizer, vocab_size), n)  # (T,) each
    fires, act_sum = torch.zeros(F_).long(), torch.zeros(F_).double()  # (F,) each
    top = torch.full((k, F_), -1.0)  # (k, F): each element's best activations so far, and where:
    top_at = torch.zeros_like(top).long()  # sequence × T + position
    stream, n_seqs = first_n(), 0
    while batch := list(itertools.islice(stream, cfg.batch_size)):
        with run.autocast(), splice_sae(run.blocks[cfg.layer], run.sae, stop=True) as seen:
            run_model(run.model, torch.stack(batch).to(run.device))  # blocks 0 … L−1, then the SAE
        c = seen.c.float()  # (B, T, F) on the run's device; only (F,) and (B, F) come to the CPU
        fires += (c > 0).sum((0, 1)).cpu()
        act_sum += c.sum((0, 1)).cpu()
        best, pos = (x.cpu() for x in c.max(1))  # (B, F): each sequence's largest activation, where
        at = pos + T * torch.arange(n_seqs, n_seqs + len(batch))[:, None]  # (B, F)
        top, keep = torch.cat([top, best]).topk(k, dim=0)  # (k, F): the best of the old top and B
        top_at = torch.cat([top_at, at]).gather(0, keep)
        n_seqs += len(batch)
    need(n_seqs, f"--dataset {cfg.dataset} holds no sequence of {T} tokens")
    chosen = chosen or fires.topk(min(cfg.top_features, F_)).indices.tolist()  # the most frequent
    needed = {at // T for at in top_at[:, chosen].flatten().tolist()}
    tokens = {s: seq.tolist() for s, seq in enumerate(first_n()) if s in needed}  # the second pass
    result = {"sae": str(cfg.sae), "n_sequences": n_seqs, "n_tokens": n_seqs * T, "features": [],
              "density": density(fires, n_seqs * T)}
    print(f"{cfg.sae} at layer {cfg.layer} of {cfg.model}, over the first {n_seqs} sequences "
          f"({n_seqs * T:,} tokens){f'; the dataset has no more than {n_seqs}' * (n_seqs < n)}"
          f"{'; beyond --eval-samples they include training data' * (n_seqs > cfg.eval_samples)}")
    for f in chosen:
        contexts = []
        for activation, at in zip(top[:, f].tolist(), top_at[:, f].tolist()):
            if activation <= 0:
                break  # it fired in fewer sequences
            (s, t), mark = divmod(at, T), min(at % T, W)
            window = tokens[s][t - mark:t + W + 1]
            pieces = [run.tokenizer.decode([i]).replace("\n", "⏎") if run.tokenizer else f" {i}"
                      for i in window]
            word = pieces[mark].lstrip() or pieces[mark]  # the mark goes after a leading space
            pieces[mark] = f"{pieces[mark][:len(pieces[mark]) - len(word)]}«{word}»"  # " «fox»"
            contexts.append({"activation": activation, "sequence": s, "position": t,
                             "tokens": window, "marked": mark, "text": "".join(pieces)})
        r = {"feature": f, "frequency": fires[f].item() / (n_seqs * T),
             "mean_activation": (act_sum[f] / max(fires[f], 1)).item(), "contexts": contexts}
        result["features"].append(r)
        print(f"\nfeature {f}: fires on {r['frequency']:.3%} of tokens, mean activation "
              f"when active {r['mean_activation']:.3g}")
        for context in contexts:
            print(f"  {context['activation']:8.3f}  {context['text']}")
    d = result["density"]
    print(f"\nfiring frequency of the {d['dead'] + sum(d['counts'])} dictionary elements "
          f"({d['dead']} dead, never firing):")
    print(text_histogram(d["log10_freq_edges"], d["counts"], "10^{:.1f} … 10^{:.1f}"))
    write_output(cfg, "inspect.json", result)
    return result


def write_output(cfg, name, result):
    """A result into --out-dir (by default the folder of the SAE looked at)."""
    write_json(Path(cfg.out_dir) / name, result)
    print(f"wrote {cfg.out_dir}/{name}")


def max_cosine(A, B, exclude_self=False, chunk_elements=2**25):
    """For each unit-norm row of A (F_A, D), its largest cosine similarity with a row of B (F_B, D):
    (F_A,). With exclude_self (B is A), the second largest (its own is 1). The (F_A, F_B) matrix is
    made chunk_elements at a time: 128 MiB in fp32, where all of it is 8 GiB at F = 46,080."""
    rows = max(1, chunk_elements // len(B))
    return torch.cat([(a @ B.T).topk(1 + exclude_self).values[:, -1] for a in A.split(rows)])


@torch.no_grad()
def compare(cfg):
    """--compare DIR_A DIR_B: each element of A's largest cosine similarity with any of B (cross:
    is it in B too?) and with another of A (within-SAE: how spread out is A?), as the paper does."""
    device = process_device(cfg)  # rows of unit norm, (F_A, D) and (F_B, D):
    A, B = (load_sae(folder)[0].dictionary.T.to(device) for folder in cfg.compare)
    need(A.shape[1] == B.shape[1],
         f"the SAEs read different widths ({A.shape[1]} and {B.shape[1]}): they cannot be compared")
    result, edges = dict(zip("ab", cfg.compare)), [i / 20 for i in range(21)]
    pairs = [("cross", max_cosine(A, B))]
    pairs += [("within", max_cosine(A, A, True))] if len(A) > 1 else []  # one element: no "within"
    for name, values in pairs:
        v = values.double().clamp(-1, 1).cpu()  # rounding can take a cosine of 1 just above it
        q = torch.quantile(v, torch.linspace(0, 1, 5).double()).tolist()  # quartiles, ends
        counts = torch.histogram(v[v >= 0], torch.tensor(edges).double()).hist.long().tolist()
        stats = dict(zip("min q1 median q3 max".split(), q))
        r = result[name] = {"mean": v.mean().item(), **stats, "below_0": int((v < 0).sum()),
                            "edges": edges, "counts": counts, "values": v.tolist()}  # below 0: apart
        print(f"{name}-SAE max cosine similarity of A's {len(A)} elements with "
              f"{'any of B' if name == 'cross' else 'another of A'}'s: mean {r['mean']:.3f} | "
              f"quartiles {q[1]:.3f} {q[2]:.3f} {q[3]:.3f} | min {q[0]:.3f} max {q[4]:.3f}")
        print(text_histogram(edges, counts, "{:.2f} … {:.2f}"))
    write_output(cfg, "compare.json", result)
    return result


# -----------------------------------------------------------------------------
# The command line

# What a saved run's configuration does not pass on: what to do now, and where.
NOT_INHERITED = ("eval_only sae benchmark resume overwrite out_dir device dtype compile inspect "
                 "features top_features inspect_samples compare").split()
# What may differ from the run's own configuration when resuming (unless given, the run's own).
# --eval-every, --log-every, --save-every change neither SAE nor data; device, dtype, --compile
# change the arithmetic (no longer bitwise); --n-samples, the learning-rate schedule from then on.
RESUMABLE = "resume n_samples eval_every log_every save_every device dtype compile".split()


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one sentence instead of argparse's usage dump
        raise UserError(f"{message} (see --help)")


def build_parser():
    """One --flag per Config field (n_samples: --n-samples); the field's comment is its help."""
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    source = Path(__file__).read_text()
    for f in fields(Config):
        kind = next(t for t in typing.get_args(f.type) or [f.type] if t is not type(None))  # T|None
        how = (dict(action=argparse.BooleanOptionalAction) if kind is bool else
               dict(nargs=2, metavar=("DIR_A", "DIR_B")) if kind == list[str] else
               dict(type=kind, metavar=kind.__name__.upper()))
        help = re.search(rf"\n    {f.name}: .*  # (.*)", source)[1]
        help += f" (default: {f.default})" * (f.default is not None)
        # No defaults here: then the flags given are known, and override saved configurations.
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=argparse.SUPPRESS, help=help,
                            **how)
    return parser


def parse_config(argv=None):
    """The run's Config, from one merge: defaults < presets (--model tiny, --benchmark) < what a
    saved run or SAE states (--resume, --eval-only, --inspect, --init-from) < the flags given now.
    A flag given must equal a resumed run's own (but RESUMABLE), and a saved SAE's layer, basis."""
    given, saved = vars(build_parser().parse_args(argv)), {}
    resume, looking = given.get("resume"), given.get("eval_only") or given.get("inspect")
    folder = not resume and (looking and given.get("sae") or given.get("init_from"))
    if resume:
        saved = {k: v for k, v in read_config(resume).items()
                 if k not in NOT_INHERITED or k in RESUMABLE}
    elif folder:  # the SAE looked at, or started from, and what its files state
        stated = read_sae(folder)[1]
        keep = lambda k: k not in NOT_INHERITED if looking else k in "model layer center".split()
        saved = {k: v for k, v in stated.items() if keep(k)}
        for k in {"layer", "center"} & set(stated):
            need(given.get(k, stated[k]) == stated[k], f"--{k} {given.get(k)} does not fit the SAE "
                 f"in {folder}, saved with --{k} {stated[k]}")
    if resume:
        folder = given["resume"] = saved["out_dir"] = os.path.normpath(resume)
        need((Path(folder) / "checkpoint.pt").exists() or (Path(folder) / "metrics.json").exists(),
             f"{folder} holds no checkpoint.pt to resume from")
        for key, value in given.items():
            flag, own = f"--{key.replace('_', '-')}", saved.get(key)
            same = value == own or key == "out_dir" and os.path.normpath(value) == own
            need(key in RESUMABLE or same, f"{flag} {value} contradicts the run in {folder} "
                 f"({flag} {own}); only --n-samples, --eval-every, --log-every, --save-every, "
                 "--device, --dtype and --compile may change when resuming")
    elif looking or "compare" in given:  # eval.json, inspect.json, compare.json: beside A's SAE
        need(saved or not folder or {"model", "layer"} <= set(given),
             f"{folder} has no config.json: pass --model and --layer with --eval-only or --inspect")
        sae = folder or given.get("compare", [""])[0]
        saved["out_dir"] = str(Path(sae).parent) if Path(sae).is_file() else sae
    preset = dict(TINY_RUN) if given.get("model", saved.get("model")) == "tiny" else {}
    if given.get("benchmark"):
        device = given.get("device", "cuda" if torch.cuda.is_available() else "cpu")
        preset.update(BENCHMARK_RUN, **({} if device.startswith("cuda") else BENCHMARK_RUN_CPU))
    return Config(**{**preset, **saved, **given})


def main(argv=None):
    cfg = None
    try:
        cfg = parse_config(argv)
        need(WORLD_SIZE == 1 or not (cfg.inspect or cfg.compare),
             "--inspect and --compare run in one process: start them with python, not torchrun")
        import_libraries()
        transformers.logging.set_verbosity_error()  # the terminal is for our own output, and the
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # libraries' errors reach the
        datasets.disable_progress_bars()  # user as one sentence
        task = (compare if cfg.compare else inspect if cfg.inspect else benchmark if cfg.benchmark
                else evaluate_saved if cfg.eval_only else train)
        task(cfg)
    except UserError as e:
        # A mistake in the flags is every process's alike, and rank 0 says it; a later error may be
        # one process's own (its GPU, its view of the files), so each process that meets it says it.
        if MAIN_PROCESS or cfg is not None:
            print(f"error{'' if MAIN_PROCESS else f' (rank {RANK})'}: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # all processes stopped after the same step; rank 0 checkpointed
        print0(f"stopped: {e.args[1]}", file=sys.stderr)
        sys.exit(128 + e.args[0])  # the signal's number
    except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C
        print0("stopped: interrupted (any checkpoint already written is intact)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
