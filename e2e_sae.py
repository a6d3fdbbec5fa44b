"""
End-to-end sparse dictionary learning in one file.

Braun, Taylor, Goldowsky-Dill, Sharkey (2024), "Identifying Functionally Important Features with
End-to-End Sparse Dictionary Learning", arXiv:2405.12241.

A sparse autoencoder (SAE) reads the residual stream `a` entering block L of a language model and
writes back a sparse reconstruction `â`:

    c = ReLU(W_e a + b_e)     â = D_n c + b_d     (D_n: the decoder with unit-norm columns)

This file trains it with any of the paper's three losses, where φ = λ / D:

    local    MSE(â, a)                                   + φ‖c‖₁   (reconstruct the activations)
    e2e      KL(P_orig ‖ P_sae)                          + φ‖c‖₁   (keep the model's output the same)
    e2e_ds   0.5·KL + (β/N) Σ_k MSE(a_k^sae, a_k^orig)   + φ‖c‖₁   (... and the later layers too)

Run it:

    python e2e_sae.py --loss e2e --layer 6         # the paper's GPT-2 small run (GPU, downloads)
    python e2e_sae.py --model tiny                 # a random 12-block GPT-2, random tokens: seconds on a CPU
    python e2e_sae.py --eval-only --sae out/e2e_layer6
    python e2e_sae.py --benchmark --loss e2e --layer 6   # tokens/s, MFU and memory at GPT-2-small scale
    torchrun --nproc_per_node=8 e2e_sae.py --loss e2e --layer 6   # the same run, split over 8 GPUs
    python e2e_sae.py --help                       # every flag, with its default

tutorial.md walks through this file section by section.

Dimension letters used in shape comments:
    B batch (sequences)   T positions   D model width   F dictionary size   V vocabulary
    E evaluation sequences   N downstream layers (the blocks after L)
"""

import argparse
import itertools
import json
import math
import os
import random
import signal
import socket
import sys
import time
import typing
import urllib.parse
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

# -----------------------------------------------------------------------------
# Config

PAPER_DATASET = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
LOSSES = ("local", "e2e", "e2e_ds")
# λ of the paper's layer-6 GPT-2 runs with similar CE loss increase (appendix table), and the weight
# of the KL term: e2e_ds halves it because the downstream MSE also pushes towards the original model.
PAPER_SPARSITY_COEFF = {"local": 4.0, "e2e": 3.0, "e2e_ds": 50.0}
PAPER_KL_COEFF = {"local": 0.0, "e2e": 1.0, "e2e_ds": 0.5}
# On the command line, `--model tiny` changes these defaults (flags you pass still win) so that a
# whole run takes seconds. Config(model="tiny") in Python keeps the paper's defaults.
TINY_RUN = dict(dataset="random", n_ctx=128, n_samples=1024, eval_samples=32, warmup_samples=128,
                eval_every=512)
# `--benchmark` defaults: GPT-2 small's shapes with random weights and tokens (no download), micro-batch
# 8 × 1024 as in the paper; on a CPU a micro-batch of 1 × 128 and 1 + 3 steps, to finish in seconds.
BENCHMARK_RUN = dict(model="gpt2-random", dataset="random", grad_accum=1)
BENCHMARK_RUN_CPU = dict(batch_size=1, n_ctx=128, bench_warmup=1, bench_steps=3)


class UserError(Exception):
    """A problem the user can fix (a flag, a path, the network): main() prints it as one sentence."""


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    model: str = arg("gpt2", "HF hub id, local folder (save_pretrained), 'gpt2-random' (GPT-2 small's shapes, "
                             "random weights), or 'tiny' (a small random GPT-2; on the command line it also "
                             "shrinks the run's defaults, see TINY_RUN). The two random ones need no download")
    dataset: str = arg(PAPER_DATASET, "HF hub id (streamed), .txt file or folder, .jsonl, .parquet, "
                                      "datasets.save_to_disk folder, or 'random' (uniform token ids)")
    loss: str = arg("e2e", "local | e2e | e2e_ds")
    layer: int = arg(6, "L: the SAE reads and replaces the residual stream entering block L")
    dict_ratio: float = arg(60.0, "F / D: dictionary size as a multiple of the model width")
    sparsity_coeff: float | None = arg(None, "λ, with φ = λ / D (default: the paper's layer-6 λ for "
                                             "--loss: local 4, e2e 3, e2e_ds 50)")
    kl_coeff: float | None = arg(None, "weight of the KL term (default: 1.0 for e2e, 0.5 for e2e_ds)")
    downstream_coeff: float = arg(2.5, "β: weight of the downstream reconstruction term of e2e_ds")
    # data and optimisation (sample counts are in sequences of n_ctx tokens)
    n_samples: int = arg(400_000, "training sequences in total")
    batch_size: int = arg(8, "sequences per micro-batch")
    grad_accum: int = arg(2, "micro-batches per optimiser step")
    n_ctx: int = arg(1024, "tokens per sequence")
    lr: float = arg(5e-4, "Adam learning rate after warm-up")
    lr_min_ratio: float = arg(0.1, "the cosine schedule decays the learning rate to this fraction of --lr")
    warmup_samples: int = arg(20_000, "linear learning-rate warm-up, in sequences")
    grad_clip: float = arg(10.0, "maximum gradient norm")
    shuffle_buffer: int = arg(1000, "hub datasets are shuffled through a buffer of this many sequences "
                                    "(local datasets are held in memory and shuffled whole)")
    seed: int = arg(0, "seed of the SAE's initialisation and of the training order")
    # evaluation and output
    eval_samples: int = arg(500, "the first this-many sequences of the dataset: held out, never trained on")
    eval_every: int = arg(20_000, "evaluate every this-many training sequences (0: only at the end)")
    log_every: int = arg(10, "write a training line to log.jsonl every this-many optimiser steps")
    out_dir: str | None = arg(None, "output folder (default: out/<loss>_layer<L>)")
    save_every: int = arg(20_000, "write a checkpoint every this-many training sequences (0: only when "
                                  "interrupted by SIGINT/SIGTERM)")
    resume: str | None = arg(None, "continue the run in this output folder from its checkpoint")
    overwrite: bool = arg(False, "replace the run already in --out-dir")
    # hardware
    device: str | None = arg(None, "cuda, cpu, cuda:1, ... (default: cuda if available)")
    dtype: str | None = arg(None, "autocast dtype, bf16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    compile: bool = arg(False, "torch.compile the model's blocks and the SAE (slower start, faster steps)")
    # measuring speed
    benchmark: bool = arg(False, "time training steps on random tokens and print tokens/s, MFU and peak "
                                 "memory (default model gpt2-random; see BENCHMARK_RUN); writes nothing")
    bench_warmup: int = arg(3, "--benchmark: untimed steps first (compilation, allocator, kernel choice)")
    bench_steps: int = arg(10, "--benchmark: timed optimiser steps")
    # evaluating a saved SAE
    eval_only: bool = arg(False, "evaluate the SAE in --sae instead of training one")
    sae: str | None = arg(None, "folder holding sae.safetensors (and config.json), for --eval-only and --inspect")
    # looking inside a trained SAE
    inspect: bool = arg(False, "print (and write to inspect.json in --sae) the contexts that make features of "
                               "the SAE in --sae fire, and a histogram of how often its elements fire")
    features: str | None = arg(None, "--inspect: comma-separated dictionary elements to show, e.g. 12,345")
    top_features: int = arg(10, "--inspect without --features: show the this-many most often firing elements")
    inspect_samples: int | None = arg(None, "--inspect: the first this-many sequences of the dataset "
                                            "(default: the run's --eval-samples, which training never saw)")
    compare: list[str] | None = arg(None, "DIR_A DIR_B: for each dictionary element of A, its largest cosine "
                                          "similarity with B's and with A's other elements (writes compare.json)")

    def __post_init__(self):
        # Defaults that depend on other fields. (TINY_RUN is applied by parse_config, on the command line only.)
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.sparsity_coeff is None:
            self.sparsity_coeff = PAPER_SPARSITY_COEFF[self.loss]
        if self.kl_coeff is None:
            self.kl_coeff = PAPER_KL_COEFF[self.loss]
        if self.resume is not None:
            self.out_dir = self.resume  # a resumed run writes where it was
        if self.out_dir is None:
            self.out_dir = f"out/{self.loss}_layer{self.layer}"
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None:
            self.dtype = "bf16" if self.device.startswith("cuda") else "fp32"
        self.validate()

    def validate(self):
        def need(ok, message):
            if not ok:
                raise UserError(message)
        for name in ("sparsity_coeff", "kl_coeff", "downstream_coeff", "lr", "grad_clip"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, f"--{name.replace('_', '-')} must be a finite number ≥ 0, not {value}")
        need(self.lr > 0, "--lr must be > 0")
        for name in ("n_samples", "batch_size", "grad_accum", "n_ctx", "shuffle_buffer", "log_every", "eval_samples"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0, not {getattr(self, name)}")
        need(self.bench_steps > 0, f"--bench-steps must be > 0, not {self.bench_steps}")
        need(not (self.resume and self.overwrite), "--resume and --overwrite contradict each other")
        for name in ("eval_every", "warmup_samples", "layer", "bench_warmup", "save_every"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be ≥ 0, not {getattr(self, name)}")
        need(self.dict_ratio > 0, f"--dict-ratio must be > 0, not {self.dict_ratio}")
        need(0 <= self.lr_min_ratio <= 1, "--lr-min-ratio must be between 0 and 1")
        need(self.n_ctx >= 2, "--n-ctx must be at least 2 (a next-token prediction needs two tokens)")
        need(self.eval_only or self.inspect or self.n_samples >= self.batch_size * self.grad_accum,
             f"--n-samples {self.n_samples} is less than one optimiser step "
             f"(--batch-size × --grad-accum = {self.batch_size * self.grad_accum})")
        need(self.dtype in ("bf16", "fp32"), f"--dtype must be bf16 or fp32, not {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise UserError(f"--device must name a device such as cpu, cuda or cuda:1, not {self.device!r}") from None
        need(self.sae is not None or not (self.eval_only or self.inspect), "--eval-only and --inspect need --sae DIR")
        need(self.top_features > 0, f"--top-features must be > 0, not {self.top_features}")
        need(self.inspect_samples is None or self.inspect_samples > 0, f"--inspect-samples must be > 0, not {self.inspect_samples}")

    @property
    def samples_per_step(self):
        return self.batch_size * self.grad_accum


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence instead of argparse's usage dump
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """One --flag per Config field: Config.n_samples becomes --n-samples, with the field's help."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})" if f.default is not None else f.metadata["help"]
        # Defaults are suppressed so that we know which flags were given (they override saved configs).
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help)
            continue
        if typing.get_args(kind):  # `float | None` parses as float
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if typing.get_origin(kind) is list:  # --compare DIR_A DIR_B
            parser.add_argument(flag, nargs=2, default=argparse.SUPPRESS, help=help, metavar=("DIR_A", "DIR_B"))
            continue
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help, metavar=kind.__name__.upper())
    return parser


def parse_config(argv=None) -> Config:
    """Build the Config from command-line flags: --layer 6 sets Config.layer, and so on."""
    given = vars(build_parser().parse_args(argv))
    if given.get("resume"):
        return resume_config(given)
    if given.get("eval_only") or given.get("inspect"):
        return eval_only_config(given)
    if given.get("compare"):
        return Config(**{"out_dir": given["compare"][0], **given})  # compare.json goes beside A's files
    defaults = {}
    if given.get("benchmark"):
        on_gpu = given.get("device", "cuda" if torch.cuda.is_available() else "cpu").startswith("cuda")
        defaults = {**BENCHMARK_RUN, **({} if on_gpu else BENCHMARK_RUN_CPU)}
    if given.get("model", defaults.get("model")) == "tiny":
        defaults = {**TINY_RUN, **defaults}
    return Config(**{**defaults, **given})


# What a saved configuration never passes on: what to do now, and where (this machine decides).
NOT_INHERITED = ("eval_only", "sae", "benchmark", "resume", "overwrite", "out_dir", "device", "dtype",
                 "inspect", "features", "top_features", "inspect_samples", "compare")


def config_fields(saved: dict) -> dict:
    """The Config fields of a saved run configuration, without NOT_INHERITED."""
    return {k: v for k, v in saved.items() if k in {f.name for f in fields(Config)} and k not in NOT_INHERITED}


def read_saved_config(folder: Path) -> dict:
    """The Config fields of folder/config.json (the file also holds d_model, dict_size and n_layers)."""
    try:
        return config_fields(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{folder / 'config.json'} is not a readable run configuration ({first_line(e)})") from None


def eval_only_config(given: dict) -> Config:
    """--eval-only: the saved run's config.json, overridden by the flags given now."""
    folder = Path(given["sae"]) if given.get("sae") else None
    saved = {}
    if folder is not None and (folder / "config.json").exists():
        saved = read_saved_config(folder)  # metrics go to --out-dir if given, else into the SAE's folder
    elif folder is not None and not {"model", "layer"} <= set(given):
        raise UserError(f"{folder} has no config.json: pass --model and --layer with --eval-only or --inspect")
    cfg = {**(TINY_RUN if given.get("model", saved.get("model")) == "tiny" else {}), **saved, **given}
    cfg.setdefault("out_dir", str(folder) if folder else None)
    return Config(**cfg)


# Flags that may differ from the checkpoint's when resuming. The first three change neither the SAE nor
# the data; another device, dtype or --compile changes the arithmetic, so the run is then no longer
# bitwise the one left alone. Unless given, these too are the checkpoint's.
RESUMABLE = ("eval_every", "log_every", "save_every", "device", "dtype", "compile")


def resume_config(given: dict) -> Config:
    """--resume DIR: the checkpoint's config; flags given now may only change the RESUMABLE fields."""
    folder = Path(given["resume"])
    for key in given:
        if key in NOT_INHERITED and key not in RESUMABLE and key != "resume":
            raise UserError(f"--{key.replace('_', '-')} cannot be combined with --resume")
    if (folder / "metrics.json").exists() and not (folder / "checkpoint.safetensors").exists():
        saved = read_saved_config(folder)  # a finished run: train() says there is nothing to resume
    else:
        config = checkpoint_state(folder)["config"]
        saved = {**config_fields(config), **{k: config[k] for k in ("device", "dtype") if k in config}}
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if key not in RESUMABLE and key != "resume" and value != saved.get(key):
            raise UserError(f"{flag} {value} contradicts the checkpoint in {folder} ({flag} {saved.get(key)}); "
                            f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change when resuming")
    return Config(**{**saved, **given, "out_dir": str(folder)})


# -----------------------------------------------------------------------------
# The SAE


class SAE(nn.Module):
    """
    c = ReLU(W_e a + b_e)        W_e: (F, D), b_e: (F,)      the sparse code
    â = D_n c + b_d              D_n: (D, F), b_d: (D,)      the reconstruction

    D_n is the decoder weight with every column (dictionary element) scaled to unit L2 norm. The
    normalisation happens inside forward(), so gradients flow through it, and the L1 penalty on c
    cannot be dodged by shrinking c while growing the dictionary. There is no pre-encoder bias.
    """

    def __init__(self, d_model: int, dict_size: int):
        super().__init__()
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


def save_sae(sae: SAE, path: Path):
    """sae.safetensors, laid out so that â = relu(a @ W_enc + b_enc) @ W_dec + b_dec."""
    with torch.no_grad():
        tensors = {
            "W_enc": sae.encoder.weight.T,  # (D, F)
            "b_enc": sae.encoder.bias,  # (F,)
            "W_dec": sae.dictionary.T,  # (F, D), one unit-norm row per dictionary element
            "b_dec": sae.decoder.bias,  # (D,)
        }
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_sae(folder) -> tuple[SAE, "Config | None"]:
    """The SAE saved in folder/sae.safetensors, and the run's Config if folder/config.json exists."""
    folder = Path(folder)
    try:
        t = load_file(str(folder / "sae.safetensors"))
        d_model, dict_size = t["W_enc"].shape
        sae = SAE(d_model, dict_size)
        with torch.no_grad():
            sae.encoder.weight.copy_(t["W_enc"].T)
            sae.encoder.bias.copy_(t["b_enc"])
            sae.decoder.weight.copy_(t["W_dec"].T)
            sae.decoder.bias.copy_(t["b_dec"])
    except FileNotFoundError:
        raise UserError(f"{folder} holds no sae.safetensors") from None
    except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder / 'sae.safetensors'} is not a valid SAE file ({e})") from None
    cfg = None
    if (folder / "config.json").exists():
        cfg = Config(**read_saved_config(folder))
    return sae, cfg


# -----------------------------------------------------------------------------
# Hooks: reading and replacing the residual stream of a Hugging Face model


# Where the blocks and the final norm sit in each supported family of Hugging Face models.
ARCHITECTURES = {
    "transformer.h": "transformer.ln_f",  # GPT-2
    "model.layers": "model.norm",  # Llama, Mistral, Qwen
    "gpt_neox.layers": "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
}


def _get(model: nn.Module, path: str):
    for name in path.split("."):
        model = getattr(model, name, None)
    return model


def _architecture(model: nn.Module) -> tuple[str, str]:
    for blocks, norm in ARCHITECTURES.items():
        if isinstance(_get(model, blocks), nn.ModuleList):
            return blocks, norm
    raise UserError(f"cannot find the decoder blocks of {type(model).__name__} "
                    "(supported: GPT-2, Llama/Mistral/Qwen, GPT-NeoX)")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks; block L's input is HF's hidden_states[L]."""
    return _get(model, _architecture(model)[0])


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the unembedding (GPT-2's ln_f)."""
    return _get(model, _architecture(model)[1])


class StopForward(Exception):
    """Raised by a hook to end the forward pass early (the local loss needs nothing after block L)."""


def _block_input(args, kwargs) -> torch.Tensor:
    # Blocks take the residual stream as their first argument, positional or keyword by model.
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_resid(blocks: nn.ModuleList, layers, stop_at: int | None = None):
    """Within the block, resid[k] holds the input of block k for each k in layers (hidden_states[k]).
    With stop_at, the forward pass ends as block stop_at is reached (after recording its input)."""
    resid = {}

    def hook(k, module, args, kwargs):
        resid[k] = _block_input(args, kwargs)  # (B, T, D)
        if k == stop_at:
            raise StopForward

    handles = [blocks[k].register_forward_pre_hook(partial(hook, k), with_kwargs=True) for k in layers]
    try:
        yield resid
    finally:
        for h in handles:
            h.remove()


@contextmanager
def splice_sae(block: nn.Module, sae: SAE):
    """Within the block, the input a of `block` is replaced by the SAE's reconstruction â.
    The returned namespace holds the a, â and c of the latest forward pass."""
    seen = SimpleNamespace(a=None, a_hat=None, c=None)

    def hook(module, args, kwargs):
        a = _block_input(args, kwargs)  # (B, T, D)
        seen.a = a
        seen.a_hat, seen.c = sae(a)  # (B, T, D), (B, T, F)
        a_hat = seen.a_hat.to(a.dtype)  # autocast may have made it bf16; the residual stream keeps its dtype
        if args:
            return (a_hat, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": a_hat}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def capture_calls(blocks: nn.ModuleList, layers):
    """Within the block, calls[k] holds, for each k in layers, the arguments of block k's latest call:
    calls[k].x its input (B, T, D), and calls[k].args / .kwargs everything the model passed it
    (attention mask, positions, rotary embeddings, ... which may differ from block to block)."""
    calls = {}

    def hook(k, module, args, kwargs):
        calls[k] = SimpleNamespace(x=_block_input(args, kwargs), args=args, kwargs=kwargs)

    handles = [blocks[k].register_forward_pre_hook(partial(hook, k), with_kwargs=True) for k in layers]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def run_blocks(blocks: nn.ModuleList, start: int, x: torch.Tensor, calls: dict) -> torch.Tensor:
    """Blocks start, start+1, … applied to x (B, T, D), block k given the other arguments it received
    in calls[k]: this resumes a captured forward pass at block `start` with a new input. (That pass
    must have run with use_cache=False: a key/value cache would be extended twice.)"""
    for k in range(start, len(blocks)):
        args = calls[k].args[1:] if calls[k].args else ()
        kwargs = {name: v for name, v in calls[k].kwargs.items() if name != "hidden_states"}
        x = blocks[k](x, *args, **kwargs)
        x = x[0] if isinstance(x, tuple) else x  # (B, T, D); some models return (hidden, extras)
    return x


def run_model(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits (B, T, V), or None when a StopForward hook ended the pass early."""
    try:
        return model(input_ids=tokens, use_cache=False).logits
    except StopForward:
        return None


# -----------------------------------------------------------------------------
# Losses: pure functions of tensors, in the paper's symbols. "Mean over tokens" is over all B·T positions.


def sparsity(c: torch.Tensor, phi: float) -> torch.Tensor:
    """φ · mean_tokens ‖c‖₁, with φ = λ / D so that one λ works across model widths.
    c comes out of a ReLU, so ‖c‖₁ is the plain sum over F (cheaper than a norm's backward). The sum
    accumulates in fp32 without an fp32 copy of the (B, T, F) code."""
    return phi * c.sum(-1, dtype=torch.float32).mean()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (tokens × D), in fp32."""
    return F.mse_loss(x.float(), y.float())


def kl_div(logits_orig: torch.Tensor, logits_sae: torch.Tensor) -> torch.Tensor:
    """KL(P_orig ‖ P_sae) = mean_tokens Σ_v p_orig(v) (log p_orig(v) − log p_sae(v)).
    Inputs are (B, T, V) logits; log-softmax and the sum over V run in fp32."""
    log_p = F.log_softmax(logits_orig.float(), dim=-1).flatten(0, -2)  # (B·T, V)
    log_q = F.log_softmax(logits_sae.float(), dim=-1).flatten(0, -2)  # (B·T, V)
    # With log_target, F.kl_div(input, target) sums exp(target) · (target − input)
    #   = Σ_v p_orig(v) (log p_orig(v) − log p_sae(v)); "batchmean" divides by the B·T rows.
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


KL_CHUNK_ELEMENTS = 2**25  # unembed_kl handles rows × V ≤ this at a time: 128 MiB per fp32 (rows, V) tensor


class UnembedKL(torch.autograd.Function):
    """kl_div(h_orig W_Uᵀ + b_U, h_sae W_Uᵀ + b_U) from the final hidden states h (B, T, D), without
    ever holding a (B, T, V) tensor. The B·T positions pass through the unembedding a chunk of rows at
    a time, and each chunk's gradient is computed on the spot, so nothing of size V is kept for backward.
    With z = h W_Uᵀ + b_U, p = softmax(z_orig), q = softmax(z_sae), and N = B·T positions:

        KL = (1/N) Σ_positions Σ_v p(v) (log p(v) − log q(v))
        ∂KL/∂z_sae = (q − p) / N        ∂KL/∂h_sae = (q − p) W_U / N

    The unembedding is frozen and h_orig is a constant: neither gets a gradient."""

    @staticmethod
    def forward(ctx, h_orig, h_sae, W_U, b_U, chunk_rows):
        assert chunk_rows > 0 and not W_U.requires_grad, "the unembedding must be frozen"
        h_o, h_s = h_orig.flatten(0, -2), h_sae.flatten(0, -2)  # (N, D)
        n = h_s.shape[0]
        kl = torch.zeros((), device=h_s.device)
        grad = torch.empty(h_s.shape, device=h_s.device) if ctx.needs_input_grad[1] else None  # (N, D) fp32
        # Logits in fp32, outside autocast: GPT-2's logits lie tens of units below zero, where bf16's
        # steps are 0.125–0.5 apart and the KL would measure rounding (see also fp32_logits).
        with torch.autocast(h_s.device.type, enabled=False):
            for i in range(0, n, chunk_rows):
                rows = slice(i, i + chunk_rows)
                log_p = F.log_softmax(F.linear(h_o[rows].float(), W_U, b_U), dim=-1)  # (rows, V)
                log_q = F.log_softmax(F.linear(h_s[rows].float(), W_U, b_U), dim=-1)  # (rows, V)
                p = log_p.exp()  # (rows, V)
                kl += (p * (log_p - log_q)).sum()
                if grad is not None:
                    grad[rows] = (log_q.exp() - p) @ W_U  # (rows, D): (q − p) W_U
        ctx.save_for_backward(grad)
        ctx.n, ctx.shape, ctx.dtype = n, h_sae.shape, h_sae.dtype
        return kl / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return None, (grad * (grad_kl / ctx.n)).view(ctx.shape).to(ctx.dtype), None, None, None


def unembed_kl(h_orig: torch.Tensor, h_sae: torch.Tensor, unembed: nn.Linear, chunk_rows: int | None = None):
    """KL(P_orig ‖ P_sae) from the final hidden states (B, T, D) and the model's unembedding (V, D)."""
    chunk_rows = chunk_rows or max(1, KL_CHUNK_ELEMENTS // unembed.weight.shape[0])
    if not torch.is_grad_enabled():
        h_sae = h_sae.detach()  # no gradient wanted: UnembedKL then skips computing it
    return UnembedKL.apply(h_orig, h_sae, unembed.weight, unembed.bias, chunk_rows)


def local_loss(a, a_hat, c, phi):
    """L_local = MSE(â, a) + φ‖c‖₁"""
    terms = {"mse": mse(a_hat, a), "sparsity": sparsity(c, phi)}
    return terms["mse"] + terms["sparsity"], terms


def e2e_loss(kl, c, phi, kl_coeff=1.0):
    """L_e2e = KL(P_orig ‖ P_sae) + φ‖c‖₁   (kl from kl_div or unembed_kl, weighted by kl_coeff: 1 in the paper)"""
    terms = {"kl": kl, "sparsity": sparsity(c, phi)}
    return kl_coeff * terms["kl"] + terms["sparsity"], terms


def e2e_ds_loss(kl, c, resid_orig, resid_sae, phi, beta, kl_coeff=0.5):
    """L_e2e+ds = 0.5·KL(P_orig ‖ P_sae) + φ‖c‖₁ + (β/N) Σ_k MSE(a_k^sae, a_k^orig)   (0.5 is kl_coeff)
    resid_orig, resid_sae: lists of the N residual streams (B, T, D) entering blocks L+1 … n_layer−1."""
    loss, terms = e2e_loss(kl, c, phi, kl_coeff)
    terms["downstream"] = sum(mse(s, o) for s, o in zip(resid_sae, resid_orig)) / len(resid_orig)
    return loss + beta * terms["downstream"], terms


def compute_loss(cfg: Config, model, blocks, sae: nn.Module, tokens: torch.Tensor, kl_chunk_rows: int | None = None):
    """One micro-batch of tokens (B, T) → (loss, its terms, c). sae is an SAE, or its DDP wrapper.

    This is the training step's fast path. evaluate() computes the same quantities the plain way (the
    whole model run twice, the SAE hooked in, full logits); the tests hold the two ways together. It saves:
      - the work before block L: the clean and the spliced run are identical up to there, so the spliced
        run starts at block L, each block getting the arguments the model gave it in the clean run;
      - the (B, T, V) logits: the KL comes from the final hidden states through unembed_kl;
      - for local, everything after block L: it never runs.
    Only the SAE's weights get gradients: the model is frozen and a is a constant."""
    L = cfg.layer
    phi = cfg.sparsity_coeff / model.config.hidden_size  # φ = λ / D
    if cfg.loss == "local":
        with torch.no_grad(), record_resid(blocks, [L], stop_at=L) as resid:
            run_model(model, tokens)  # blocks L, L+1, … and the unembedding never run
        a = resid[L]  # (B, T, D)
        a_hat, c = sae(a)  # (B, T, D), (B, T, F)
        loss, terms = local_loss(a, a_hat, c, phi)
        return loss, terms, c

    downstream = range(L + 1, len(blocks)) if cfg.loss == "e2e_ds" else []
    with torch.no_grad(), capture_calls(blocks, range(L, len(blocks))) as calls:  # the clean run
        h_orig = model.base_model(input_ids=tokens, use_cache=False).last_hidden_state  # (B, T, D), after the final norm
    a = calls[L].x  # (B, T, D), the input of block L
    a_hat, c = sae(a)  # (B, T, D), (B, T, F)
    with record_resid(blocks, downstream) as resid_sae:  # the spliced run, from block L on
        h_sae = final_norm(model)(run_blocks(blocks, L, a_hat.to(a.dtype), calls))  # (B, T, D)
    kl = unembed_kl(h_orig, h_sae, model.get_output_embeddings(), kl_chunk_rows)
    if cfg.loss == "e2e":
        loss, terms = e2e_loss(kl, c, phi, cfg.kl_coeff)
    else:
        loss, terms = e2e_ds_loss(kl, c, [calls[k].x for k in downstream], [resid_sae[k] for k in downstream],
                                  phi, cfg.downstream_coeff, cfg.kl_coeff)
    return loss, terms, c


# -----------------------------------------------------------------------------
# Model and data (mostly boilerplate: where tokens come from)


@torch.no_grad()
def random_gpt2(config: GPT2Config) -> GPT2LMHeadModel:
    """A GPT-2 with random weights, the same ones every time, with PyTorch's fused attention (SDPA)."""
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    """GPT-2 small's 12 blocks at width 64, vocabulary 512. Weights are drawn 10× wider than GPT-2's
    init so that the next-token distribution is far from uniform (entropy ≈ 4.9 nats, not ln 512 = 6.2)
    and the KL has something to preserve."""
    return random_gpt2(GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=512, n_positions=1024,
                                  initializer_range=0.2, bos_token_id=511, eos_token_id=511))


RANDOM_MODELS = {"tiny": tiny_gpt2, "gpt2-random": lambda: random_gpt2(GPT2Config())}  # GPT2Config(): GPT-2 small


def hub_reachable(timeout: float = 5.0) -> bool:
    """Can we open a connection to the Hugging Face hub? (Its own client retries for ~25 s.)"""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # only the proxy can tell; let the hub client try
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


OFFLINE_HINT = "offline, use --model tiny --dataset random, or a local model folder and dataset file"
DATA_FILES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).suffix in DATA_FILES


def load_model(name: str, device: torch.device):
    """A frozen causal LM in eval mode and its tokenizer (None where the model has none)."""
    if name in RANDOM_MODELS:
        return RANDOM_MODELS[name]().to(device).eval().requires_grad_(False), None
    local = Path(name).expanduser().is_dir()
    if not local and looks_like_path(name):
        raise UserError(f"--model {name}: no such folder")
    # fp32 weights (autocast decides the compute dtype), and PyTorch's fused attention kernels (SDPA:
    # FlashAttention on recent GPUs), which never hold the (T, T) attention matrix in memory.
    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa")
    if not local and not hub_reachable():
        kwargs["local_files_only"] = True  # a copy in the HF cache still works offline
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if kwargs.get("local_files_only"):
            raise UserError(f"cannot download model {name!r}: the Hugging Face hub is unreachable; {OFFLINE_HINT}") from None
        raise UserError(f"cannot load model {name!r}: {first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=kwargs.get("local_files_only", False))
    except (OSError, ValueError, TypeError):
        tokenizer = None  # fine for pre-tokenised data; text data will say it needs one
    if tokenizer is not None and len(tokenizer) < 2:
        tokenizer = None  # a folder without tokenizer files gives an empty tokenizer, not an error
    return model.to(device).eval().requires_grad_(False), tokenizer


def open_rows(dataset: str):
    """An iterator over the dataset's rows (dicts), in its stored order. Hub datasets are streamed."""
    path = Path(dataset).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return iter(ds)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"--dataset {dataset}: the folder holds no .txt files and no save_to_disk dataset")
        builder = "text"
    elif path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"--dataset {dataset} is an empty file")
        files, builder = [path], DATA_FILES.get(path.suffix)
        if builder is None:
            raise UserError(f"--dataset {dataset}: unknown file type (use {', '.join(DATA_FILES)})")
    elif looks_like_path(dataset):
        raise UserError(f"--dataset {dataset}: no such file or folder")
    else:
        if not hub_reachable():
            raise UserError(f"cannot stream dataset {dataset!r}: the Hugging Face hub is unreachable; {OFFLINE_HINT}")
        return iter(datasets.load_dataset(dataset, split="train", streaming=True))
    # A .txt file is one document, so the EOS token goes between files, not between lines.
    extra = {"sample_by": "document"} if builder == "text" else {}
    return iter(datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                      streaming=True, **extra))


def read_rows(dataset: str):
    """open_rows, with any failure to open or read the data (files are read lazily) as one sentence."""
    try:
        yield from open_rows(dataset)
    except UserError:
        raise
    except Exception as e:  # datasets and pyarrow raise many types: not found, bad JSON, bad encoding, ...
        raise UserError(f"cannot read dataset {dataset!r}: {first_line(e)}") from None


def token_sequences(rows, n_ctx: int, tokenizer):
    """The rows as a stream of (n_ctx,) token sequences, in order. Pre-tokenised rows (input_ids) longer
    than n_ctx are cut and shorter ones skipped; text rows are tokenised and packed with EOS between them."""
    packed = []
    for row in rows:
        if "input_ids" in row:
            if len(row["input_ids"]) >= n_ctx:
                yield torch.tensor(row["input_ids"][:n_ctx])  # (T,)
        elif "text" in row:
            if tokenizer is None or tokenizer.eos_token_id is None:
                raise UserError("this dataset holds text, and the model has no tokenizer with an EOS token")
            ids = tokenizer(row["text"], add_special_tokens=False, verbose=False)["input_ids"]
            packed += ids + [tokenizer.eos_token_id]
            while len(packed) >= n_ctx:
                yield torch.tensor(packed[:n_ctx])  # (T,)
                del packed[:n_ctx]
        else:
            raise UserError(f"dataset rows need an 'input_ids' or a 'text' column; these have {sorted(row)}")


def random_sequences(vocab_size: int, n_ctx: int):
    """Uniform random token ids, for offline runs. Seeded with a constant, not --seed, so that the
    evaluation set (the first sequences) is the same for every run."""
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(vocab_size, (n_ctx,), generator=g)  # (T,)


def check_vocab(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # Caught here, an id outside the vocabulary is a sentence; on a GPU it would be a device-side assert.
    if tokens.max() >= vocab_size:
        raise UserError(f"the dataset has token id {tokens.max()}, beyond the model's vocabulary of {vocab_size}")
    return tokens


def is_streamed(dataset: str) -> bool:
    """Hub datasets (too big to hold) and `random` (endless) are streamed; local datasets are held in memory."""
    return dataset == "random" or not Path(dataset).expanduser().exists()


def shuffled(items, buffer_size: int, rng: random.Random):
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


def no_training_data(cfg: Config) -> UserError:
    return UserError(f"--dataset {cfg.dataset} has no sequences left for training after the "
                     f"{cfg.eval_samples} evaluation sequences")


def streamed_epochs(first_pass, reopen, cfg: Config, vocab_size: int):
    """Training sequences from a stream whose first eval_samples sequences were already taken: shuffled
    through a buffer, and streamed again from the start (eval sequences skipped) when it runs out."""
    rng, rest = random.Random(cfg.seed), first_pass
    while True:
        n = 0
        for seq in shuffled(rest, cfg.shuffle_buffer, rng):
            n += 1
            yield check_vocab(seq, vocab_size)
        if n == 0:
            raise no_training_data(cfg)
        rest = itertools.islice(reopen(), cfg.eval_samples, None)


def in_memory_epochs(rest, cfg: Config, vocab_size: int):
    """Training sequences of a local dataset: read once into memory, reshuffled whole every epoch."""
    seqs = list(rest)
    if not seqs:
        raise no_training_data(cfg)
    tokens = check_vocab(torch.stack(seqs), vocab_size)  # (N, T)
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        yield from tokens[torch.randperm(len(tokens), generator=g)]  # one epoch, (T,) at a time


def sequences(cfg: Config, tokenizer, vocab_size: int):
    """The dataset as a stream of (T,) token sequences, from its first one."""
    if cfg.dataset == "random":
        return random_sequences(vocab_size, cfg.n_ctx)
    return token_sequences(read_rows(cfg.dataset), cfg.n_ctx, tokenizer)


def load_data(cfg: Config, tokenizer, vocab_size: int):
    """(eval_tokens (E, T), an endless iterator of training sequences (T,)).
    The first eval_samples sequences of the dataset are the evaluation set, whatever the source, and
    training reads only the sequences after them. Nothing is read for training until it is asked for."""
    stream = partial(sequences, cfg, tokenizer, vocab_size)
    first_pass = stream()
    eval_seqs = list(itertools.islice(first_pass, cfg.eval_samples))
    if len(eval_seqs) < cfg.eval_samples:
        raise UserError(f"--dataset {cfg.dataset} holds only {len(eval_seqs)} sequences of {cfg.n_ctx} tokens, "
                        f"fewer than --eval-samples {cfg.eval_samples}")
    eval_tokens = check_vocab(torch.stack(eval_seqs), vocab_size)  # (E, T)
    if is_streamed(cfg.dataset):
        return eval_tokens, streamed_epochs(first_pass, stream, cfg, vocab_size)
    return eval_tokens, in_memory_epochs(first_pass, cfg, vocab_size)


# -----------------------------------------------------------------------------
# Many processes (boilerplate a reader may skip: none of it is part of the method)
#
# `torchrun --nproc_per_node=N e2e_sae.py ...` starts N copies of this file and tells each one, in the
# environment, its RANK (0 … N−1), its LOCAL_RANK (which GPU of its machine) and the WORLD_SIZE N.
# Together they train one SAE: each micro-batch of --batch-size sequences is split N ways, DDP averages
# the SAE's gradients, evaluation sums are added up over the processes, and rank 0 alone writes files
# and prints. A plain `python e2e_sae.py` never joins a process group, and then all of this is a no-op.


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def first_process() -> bool:
    """Rank 0, or a plain run; known from torchrun's environment even before the processes join."""
    return not launched_by_torchrun() or os.environ["RANK"] == "0"


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def join_processes(cfg: Config):
    """Join torchrun's process group: NCCL between GPUs (process i on GPU LOCAL_RANK), gloo on the CPU."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise UserError(f"--device {cfg.device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                            "pass --device cuda (or leave it out)")
        device = torch.device("cuda", device.index if device.index is not None else int(os.environ["LOCAL_RANK"]))
        try:
            torch.cuda.set_device(device)
        except (RuntimeError, AssertionError, AttributeError) as e:
            raise UserError(f"--device {device} is not usable here ({first_line(e)}); are there fewer GPUs "
                            "than processes?") from None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)


def leave_processes():
    """Leave the process group, all processes together (at the end of the run, or after an agreed stop)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def process_device(cfg: Config) -> torch.device:
    """--device, except that under torchrun "cuda" means this process's GPU (see join_processes)."""
    if dist.is_initialized() and cfg.device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(cfg.device)


def local_batch_size(cfg: Config) -> int:
    """Sequences per micro-batch in this process: --batch-size split over the processes, so that
    N processes take the same optimiser steps, on the same sequences, as one process would."""
    n = world_size()
    if cfg.batch_size % n:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {n} processes")
    return cfg.batch_size // n


def all_reduce(tensors: dict, op=dist.ReduceOp.SUM) -> dict:
    """Every tensor of the dict reduced over all processes (summed, by default), in one collective."""
    if not dist.is_initialized():
        return tensors
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([t.to(on, torch.float64).flatten() for t in tensors.values()])  # sums of counts stay exact
    dist.all_reduce(flat, op=op)
    parts = flat.split([t.numel() for t in tensors.values()])
    return {k: part.view(t.shape).to(t.device, t.dtype) for (k, t), part in zip(tensors.items(), parts)}


def mean_over_processes(tensors: dict) -> dict:
    """The mean over processes of each tensor: for means over equal shares, the mean over all of them."""
    if not dist.is_initialized():
        return tensors
    return {k: v / world_size() for k, v in all_reduce(tensors).items()}


def agreed_signal(signum: int | None, device: torch.device) -> int | None:
    """A signal seen by any process (the largest number, if several): they all stop after the same step."""
    if not dist.is_initialized():
        return signum
    return int(all_reduce({"s": torch.tensor(float(signum or 0), device=device)}, dist.ReduceOp.MAX)["s"]) or None


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_rank_0(work):
    """work() in rank 0 alone (writing files), then every process learns whether it failed: none is
    left waiting in a collective for a process that has stopped."""
    failed = None
    if rank() == 0:
        try:
            work()
        except UserError as e:
            failed = e
    if dist.is_initialized() and all_reduce({"f": torch.tensor(float(failed is not None))}, dist.ReduceOp.MAX)["f"]:
        raise failed or UserError("rank 0 stopped with the error above")  # rank 0 says its own error
    if failed:
        raise failed


def from_rank_0(value):
    """Rank 0's value in every process: decisions taken from files, which other machines may not see."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def for_steps(sae: SAE, device: torch.device) -> nn.Module:
    """What train_step should call: under torchrun, the SAE wrapped in DDP, which averages its gradients
    over the processes during backward(); otherwise the SAE itself. (The frozen model needs no wrapper.)"""
    if not dist.is_initialized():
        return sae
    return DDP(sae, device_ids=[device.index] if device.type == "cuda" else None)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, blocks, sae: SAE, eval_tokens: torch.Tensor, layer: int, batch_size: int,
             autocast=nullcontext) -> dict:
    """The SAE spliced in at `layer` versus the clean model, on eval_tokens (E, T). All metrics pool
    sums over every evaluation token (no means of per-batch means):
      ce_loss_orig, ce_loss_sae   mean next-token cross-entropy over the E·(T−1) predictions
      ce_loss_increase            ce_loss_sae − ce_loss_orig
      kl                          KL(P_orig ‖ P_sae), as in the loss, over all E·T positions
      l0                          mean number of c > 0 per token
      alive_dict_elements         elements with c > 0 on at least one evaluation token
      explained_variance          1 − Σ‖a − â‖² / Σ‖a − ā‖², ā the mean of a over the tokens
      mse                         mean over elements of (â − a)²
      top1_agreement              fraction of positions where both models' argmax agree
      downstream_mse              {k: mean over elements of (a_k^sae − a_k^orig)²} for blocks k > L
      n_eval_tokens               E·T
    Under torchrun each process evaluates a contiguous share of eval_tokens and the sums are added up."""
    device = next(sae.parameters()).device
    D, F_ = sae.encoder.in_features, sae.encoder.out_features
    downstream = list(range(layer + 1, len(blocks)))
    # Sums over the evaluation tokens, in float64 on the device: nothing waits for the GPU until the end.
    zeros = partial(torch.zeros, dtype=torch.float64, device=device)
    s = {"ce_orig": zeros(()), "ce_sae": zeros(()), "kl": zeros(()), "agree": zeros(()), "sse": zeros(()),
         "sum_sq_a": zeros(()), "sum_a": zeros(D), "fires": zeros(F_), "sse_ds": zeros(len(downstream)),
         "tokens": zeros(()), "predictions": zeros(())}
    share = eval_tokens.tensor_split(world_size())[rank()]  # (≈E/N, T): this process's contiguous share
    for tokens in share.split(batch_size) if len(share) else []:  # a share can be empty when N > E
        tokens = tokens.to(device)  # (B, T)
        with autocast(), record_resid(blocks, downstream) as resid_orig:
            logits_orig = run_model(model, tokens)  # (B, T, V)
        with autocast(), splice_sae(blocks[layer], sae) as seen, record_resid(blocks, downstream) as resid_sae:
            logits_sae = run_model(model, tokens)  # (B, T, V)
        a, a_hat = seen.a.double(), seen.a_hat.double()  # (B, T, D)
        targets = tokens[:, 1:].flatten()  # (B·(T−1),)
        s["ce_orig"] += F.cross_entropy(logits_orig[:, :-1].flatten(0, 1).float(), targets, reduction="sum")
        s["ce_sae"] += F.cross_entropy(logits_sae[:, :-1].flatten(0, 1).float(), targets, reduction="sum")
        s["kl"] += kl_div(logits_orig, logits_sae) * tokens.numel()
        s["agree"] += (logits_orig.argmax(-1) == logits_sae.argmax(-1)).sum()
        s["fires"] += (seen.c > 0).flatten(0, 1).sum(0)  # (F,): on how many tokens each element fired
        s["sse"] += (a - a_hat).pow(2).sum()
        s["sum_sq_a"] += a.pow(2).sum()
        s["sum_a"] += a.sum((0, 1))  # (D,)
        for i, k in enumerate(downstream):
            s["sse_ds"][i] += (resid_sae[k].double() - resid_orig[k].double()).pow(2).sum()
        s["tokens"] += tokens.numel()
        s["predictions"] += targets.numel()
    s = {k: v.cpu() for k, v in all_reduce(s).items()}  # under torchrun: the sums over every process's share
    n_tokens, n_elements = s["tokens"], s["tokens"] * D  # E·T, E·T·D
    metrics = {
        "ce_loss_orig": s["ce_orig"] / s["predictions"],
        "ce_loss_sae": s["ce_sae"] / s["predictions"],
        "ce_loss_increase": (s["ce_sae"] - s["ce_orig"]) / s["predictions"],
        "kl": s["kl"] / n_tokens,
        "l0": s["fires"].sum() / n_tokens,
        "alive_dict_elements": (s["fires"] > 0).sum(),
        "explained_variance": 1 - s["sse"] / (s["sum_sq_a"] - s["sum_a"].pow(2).sum() / n_tokens),  # Σ‖a − ā‖² = Σ‖a‖² − n‖ā‖²
        "mse": s["sse"] / n_elements,
        "top1_agreement": s["agree"] / n_tokens,
        "downstream_mse": {k: (s["sse_ds"][i] / n_elements).item() for i, k in enumerate(downstream)},
        "n_eval_tokens": int(n_tokens),
    }
    return {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}


def format_metrics(m: dict) -> str:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if not isinstance(v, dict)]
    if m["downstream_mse"]:
        parts.append("downstream_mse " + " ".join(f"{k}:{v:.3g}" for k, v in m["downstream_mse"].items()))
    return " | ".join(parts)


# -----------------------------------------------------------------------------
# Checkpoints and the output folder (boilerplate: nothing here is part of the method)

RUN_FILES = ("config.json", "log.jsonl", "sae.safetensors", "metrics.json", "checkpoint.safetensors", "checkpoint.json",
             "cfg.json", "sae_weights.safetensors")


def atomic_write(path: Path, write):
    """write(tmp) into a temporary file beside path, then rename it over path. A crash at any moment
    leaves the old file or the new one, never half of one (os.replace is atomic on one filesystem)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would make it (safetensors makes files only the owner reads)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file either
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({first_line(e)}); the previous version, if any, is intact") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(out: Path, sae: SAE, optimizer, state: dict):
    """checkpoint.safetensors: the SAE's raw parameters, Adam's moments and step counts, and the RNG
    states; `state` (step, config, ...) and Adam's hyper-parameters as JSON in the same file's header,
    so tensors and counters are replaced together in one rename. checkpoint.json is a readable copy."""
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    adam = optimizer.state_dict()
    for i, param_state in adam["state"].items():
        tensors.update({f"adam.{i}.{k}": v for k, v in param_state.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    text = json.dumps({**state, "adam_param_groups": adam["param_groups"]}, indent=2)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(out / "checkpoint.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"state": text}))
    atomic_write(out / "checkpoint.json", lambda tmp: tmp.write_text(text + "\n"))


def checkpoint_state(folder: Path) -> dict:
    """The JSON part of folder/checkpoint.safetensors (read from its header only)."""
    path = Path(folder) / "checkpoint.safetensors"
    if not path.is_file():
        raise UserError(f"{folder} holds no checkpoint.safetensors to resume from")
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a valid checkpoint ({first_line(e)})") from None


def load_checkpoint(folder: Path, sae: SAE, optimizer) -> dict:
    """Restore the SAE, Adam and the RNGs from folder/checkpoint.safetensors; returns its state."""
    state, path = checkpoint_state(folder), Path(folder) / "checkpoint.safetensors"
    try:
        t = load_file(str(path))
        sae.load_state_dict({k.removeprefix("sae."): v for k, v in t.items() if k.startswith("sae.")})
        adam = {}
        for k, v in t.items():
            if k.startswith("adam."):
                _, i, name = k.split(".")
                adam.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": adam, "param_groups": state["adam_param_groups"]})
        torch.set_rng_state(t["rng.cpu"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a valid checkpoint for this run ({first_line(e)})") from None
    if torch.cuda.is_available() and "rng.cuda.0" in t:
        torch.cuda.set_rng_state_all([t[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in t])
    return state


def check_out_dir(cfg: Config):
    """Refuse to start a run over another one (finished or not) unless --overwrite says so."""
    out = Path(cfg.out_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not cfg.overwrite and not cfg.resume:
        what = "a finished run" if "metrics.json" in found else "an unfinished run"
        raise UserError(f"{out} already holds {what} ({', '.join(found)}): pass --overwrite to replace it"
                        + (f", --resume {out} to continue it" if "checkpoint.safetensors" in found else "")
                        + ", or another --out-dir")


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl (a line cut short by a crash is dropped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


class StopSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) only set .signum, so that
    the loop can finish its step and checkpoint. A second signal acts as usual (handlers are restored),
    except under torchrun: it passes a signal on to every process, and a scheduler may signal them
    all too, so a process would get two. There torchrun's --shutdown-timeout (30 s) is the hard stop."""

    def __init__(self):
        self.signum = None

    def _handler(self, signum, frame):
        first, self.signum = self.signum is None, signum
        if not dist.is_initialized():
            self._restore()
        if first and rank() == 0:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint"
                  + ("" if dist.is_initialized() else " (a second signal stops at once)"), file=sys.stderr)

    def _restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        self._restore()


class Interrupted(Exception):
    """A run stopped by a signal after writing its checkpoint; main() exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def make_out_dir(path: str) -> Path:
    """Create the output folder (once every other check has passed: a failed run leaves no empty one)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out-dir {path} ({first_line(e)})") from None
    return Path(path)


def save_saelens(out: Path, run_info: dict):
    """cfg.json and sae_weights.safetensors, the files SAELens's `SAE.load_from_disk(folder)` reads, in the
    format of its version 6 (architecture "standard": relu(x @ W_enc + b_enc) @ W_dec + b_dec, our SAE).
    They are written with every run rather than by an export command, so that every output folder loads
    in SAELens as it is; and since SAELens names and lays out the four tensors exactly as sae.safetensors
    does, its weights file is a second name (a hard link) for sae.safetensors: the tensors are on disk once."""
    metadata = {"sae_lens_version": "6.0.0", "model_name": run_info["model"],
                "hook_name": f"blocks.{run_info['layer']}.hook_resid_pre", "hook_head_index": None,
                "context_size": run_info["n_ctx"], "prepend_bos": False, "dataset_path": run_info["dataset"],
                # The SAE read Hugging Face's residual stream. TransformerLens by default centres the
                # weights that write into it, which changes hook_resid_pre; this makes SAELens say so.
                "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    cfg = {"architecture": "standard", "d_in": run_info["d_model"], "d_sae": run_info["dict_size"],
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata,
           "sae_lens_version": "6.0.0"}  # read here by some 6.x releases, in metadata by others

    def link_or_copy(tmp):
        try:
            os.link(out / "sae.safetensors", tmp)
        except OSError:  # a filesystem without hard links
            tmp.write_bytes((out / "sae.safetensors").read_bytes())

    atomic_write(out / "sae_weights.safetensors", link_or_copy)
    atomic_write(out / "cfg.json", lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n"))


# -----------------------------------------------------------------------------
# Training


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate of step 0 … total_steps−1 as a fraction of --lr: linear warm-up to 1, then a
    cosine decay that reaches min_ratio at the last step."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 2))  # a run shorter than its warm-up still decays
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLoss(Exception):
    """The loss or the gradient of a step is NaN or infinite (raised before the weights are updated)."""


def fp32_logits(model: nn.Module):
    """Run the unembedding outside autocast, in fp32. GPT-2's logits lie tens of units below zero,
    where neighbouring bf16 numbers are 0.125–0.5 apart: the KL would measure rounding noise."""
    head = model.get_output_embeddings()
    forward = head.forward

    def forward_fp32(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())  # (B, T, V) in fp32

    head.forward = forward_fp32


def compile_forwards(*modules: nn.Module):
    """torch.compile each module's forward(), not its __call__, so that our hooks, which run in
    __call__ around forward(), stay outside the compiled code and can come and go freely."""
    for module in modules:
        module.forward = torch.compile(module.forward)


def usable_device(cfg: Config) -> torch.device:
    """The device this process computes on, checked by putting a tensor on it."""
    try:
        device = process_device(cfg)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {cfg.device} is not usable here ({first_line(e)})") from None
    return device


def setup(cfg: Config):
    """Device, precision, model and blocks: what training and --eval-only share."""
    device = usable_device(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    transformers.logging.set_verbosity_error()  # keep the terminal for our own output
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one sentence
    datasets.disable_progress_bars()
    model, tokenizer = load_model(cfg.model, device)
    fp32_logits(model)
    blocks = decoder_blocks(model)
    n_layers, max_ctx = len(blocks), getattr(model.config, "max_position_embeddings", None)
    if not 0 <= cfg.layer < n_layers:
        raise UserError(f"--layer {cfg.layer} is outside the model's blocks 0 … {n_layers - 1}")
    if cfg.loss == "e2e_ds" and cfg.layer == n_layers - 1 and not (cfg.eval_only or cfg.inspect):
        raise UserError(f"--loss e2e_ds needs a block after --layer; {cfg.layer} is the model's last")
    if max_ctx is not None and cfg.n_ctx > max_ctx:
        raise UserError(f"--n-ctx {cfg.n_ctx} is longer than the model's context of {max_ctx} tokens")
    if getattr(model.config, "final_logit_softcapping", None):
        raise UserError(f"{cfg.model} soft-caps its logits, which unembed_kl does not model")
    return device, autocast, model, tokenizer, blocks


def train_step(cfg: Config, model, blocks, sae, optimizer, micro_batches, autocast) -> tuple[dict, torch.Tensor]:
    """One optimiser step on a list of micro-batches (B, T) → (the loss terms and L0, averaged over the
    micro-batches, as tensors on the device; the gradient norm before clipping).
    Under torchrun, sae is the SAE's DDP wrapper: the gradients and the returned terms are then the
    means over all processes, so every process takes the same step."""
    totals = {}
    for i, tokens in enumerate(micro_batches):
        # DDP averages the gradients over the processes during backward(): once, after the last micro-batch.
        accumulate_only = isinstance(sae, DDP) and i < len(micro_batches) - 1
        with sae.no_sync() if accumulate_only else nullcontext():
            with autocast():
                loss, terms, c = compute_loss(cfg, model, blocks, sae, tokens)
            (loss / len(micro_batches)).backward()
        # Kept on the device, so the step never waits for the GPU; the caller decides when to .item().
        l0 = (c > 0).sum(-1).float().mean()  # count per token first: no fp32 copy of the (B, T, F) mask
        for k, v in {"loss": loss, **terms, "l0": l0}.items():
            totals[k] = totals.get(k, 0.0) + v.detach() / len(micro_batches)
    totals = mean_over_processes(totals)
    grad_norm = nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    if not torch.isfinite(totals["loss"] + grad_norm):  # waits for the GPU once a step: no NaN reaches the weights
        raise NonFiniteLoss(", ".join(f"{k} {v.item():.4g}" for k, v in {**totals, "grad_norm": grad_norm}.items()))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm


def train(cfg: Config) -> dict:
    """Train an SAE as cfg says (or continue the run in cfg.resume), write the output folder, and
    return the final metrics. Under torchrun every process runs this; only rank 0 writes and prints."""
    out, main_process = Path(cfg.out_dir), rank() == 0
    if cfg.resume and (out / "metrics.json").exists() and not (out / "checkpoint.safetensors").exists():
        if main_process:
            print(f"{out} holds a finished run: nothing to resume")
        return json.loads((out / "metrics.json").read_text())
    check_out_dir(cfg)
    device, autocast, model, tokenizer, blocks = setup(cfg)
    batch_size = local_batch_size(cfg)  # this process's share of each micro-batch: --batch-size / N
    d_model = model.config.hidden_size
    dict_size = round(cfg.dict_ratio * d_model)
    if dict_size < 1:
        raise UserError(f"--dict-ratio {cfg.dict_ratio} × width {d_model} leaves no dictionary element")
    torch.manual_seed(cfg.seed)
    sae = SAE(d_model, dict_size).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    n_steps = cfg.n_samples // cfg.samples_per_step
    warmup_steps = cfg.warmup_samples // cfg.samples_per_step
    start_step, train_seconds, totals, steps_since_log = 0, 0.0, {}, 0
    if cfg.resume:
        state = load_checkpoint(out, sae, optimizer)
        start_step, train_seconds = state["step"], state["train_seconds"]
        totals, steps_since_log = state["log_totals"], state["steps_since_log"]  # the log line in progress
    eval_tokens, train_seqs = load_data(cfg, tokenizer, model.config.vocab_size)
    # The data position of a checkpoint is the number of training sequences read: the same seed gives
    # the same order, so a resumed run skips them and goes on exactly as the run left alone would.
    if start_step and main_process:
        print(f"resuming at step {start_step} of {n_steps}: skipping the {start_step * cfg.samples_per_step:,} "
              "training sequences already seen")
    train_seqs = itertools.islice(train_seqs, start_step * cfg.samples_per_step, None)
    # Read the first training sequence now: a dataset with no training rows fails before anything is
    # written, and the one-time read of a local dataset is not timed as training.
    train_seqs = itertools.chain([next(train_seqs)], train_seqs)
    # A run stopped just before an evaluation resumes with it.
    eval_pending = from_rank_0(0 < start_step < n_steps and crossed(cfg.eval_every, start_step, cfg) and not any(
        r["step"] == start_step and "eval/kl" in r for r in read_log(out / "log.jsonl")))
    barrier()  # every process has read the output folder before rank 0 changes it

    run_info = {**asdict(cfg), "d_model": d_model, "dict_size": dict_size, "n_layers": len(blocks),
                "n_processes": world_size()}
    log_file = None

    def prepare_out_dir():
        nonlocal log_file
        make_out_dir(cfg.out_dir)
        if cfg.overwrite:
            for name in RUN_FILES + ("inspect.json", "compare.json"):  # those describe the SAE replaced
                (out / name).unlink(missing_ok=True)
        atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(run_info, indent=2) + "\n"))
        kept = [json.dumps(r) + "\n" for r in read_log(out / "log.jsonl") if r["step"] <= start_step] if start_step else []
        atomic_write(out / "log.jsonl", lambda tmp: tmp.write_text("".join(kept)))  # a resumed run keeps its past
        try:
            log_file = open(out / "log.jsonl", "a")
        except OSError as e:
            raise UserError(f"cannot write {out / 'log.jsonl'} ({first_line(e)})") from None

    on_rank_0(prepare_out_dir)

    def log(record):
        if main_process:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    if cfg.compile:
        compile_forwards(sae, *blocks)
    step_sae = for_steps(sae, device)  # evaluation and saving use the SAE itself
    tokens_per_step = cfg.samples_per_step * cfg.n_ctx  # over all processes
    flops = flops_per_token(model, blocks, sae, cfg.loss, cfg.layer, cfg.n_ctx)
    peak = peak_flops(device, cfg.dtype)
    do_eval = partial(evaluate, model, blocks, sae, eval_tokens, cfg.layer, batch_size, autocast)
    share = slice(rank() * batch_size, (rank() + 1) * batch_size)

    def micro_batch():
        # Every process reads the same --batch-size sequences and keeps its own share of them.
        seqs = [next(train_seqs) for _ in range(cfg.batch_size)]
        return torch.stack(seqs[share]).to(device)  # (B / N, T)

    def checkpoint(step):  # every process waits until it is on disk (or has failed)
        on_rank_0(lambda: save_checkpoint(out, sae, optimizer, {
            "step": step, "samples": step * cfg.samples_per_step, "train_seconds": train_seconds,
            "config": run_info, "log_totals": {k: float(v) for k, v in totals.items()},
            "steps_since_log": steps_since_log}))

    def evaluate_and_log(step):
        metrics = do_eval()
        log({"step": step, "samples": step * cfg.samples_per_step, **{f"eval/{k}": v for k, v in metrics.items()}})
        if step < n_steps and main_process:
            tqdm.write(f"eval @ {step * cfg.samples_per_step} samples: {format_metrics(metrics)}")
        return metrics

    def stop_if_signalled(stop, step):
        signum = agreed_signal(stop.signum, device)
        if signum:
            checkpoint(step)
            bar.close()
            raise Interrupted(signum, f"{signal.Signals(signum).name} after step {step} of {n_steps}: "
                              f"checkpoint written to {out}; continue with: python e2e_sae.py --resume {out}")

    if eval_pending:
        evaluate_and_log(start_step)

    if main_process:
        print(f"{cfg.loss} SAE at layer {cfg.layer} of {cfg.model}: D={d_model} F={dict_size} λ={cfg.sparsity_coeff:g} "
              f"| {n_steps} steps of {cfg.samples_per_step} × {cfg.n_ctx} tokens | {device} {cfg.dtype}"
              + (f" | {world_size()} processes of {batch_size} sequences per micro-batch" if dist.is_initialized() else "")
              + f" → {out}")
    bar = tqdm(range(start_step, n_steps), desc="train", dynamic_ncols=True, mininterval=1.0,
               initial=start_step, total=n_steps, disable=not main_process)
    t_log = time.perf_counter()
    with StopSignal() as stop:
        for step in bar:
            lr = cfg.lr * lr_factor(step, warmup_steps, n_steps, cfg.lr_min_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                terms, grad_norm = train_step(cfg, model, blocks, step_sae, optimizer,
                                              [micro_batch() for _ in range(cfg.grad_accum)], autocast)
            except NonFiniteLoss as e:
                last = checkpoint_state(out)["step"] if (out / "checkpoint.safetensors").exists() else None
                raise UserError(f"step {step + 1}: the loss or its gradient is not finite ({e}); stopped before the "
                                "update. " + (f"The checkpoint of step {last} in {out} is intact, but resuming "
                                              "repeats the same steps: " if last is not None else "")
                                + "start again with a lower --lr (and --overwrite)") from None
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            # ---- diagnostics -------------------------------------------------------------------
            steps_since_log += 1
            samples = (step + 1) * cfg.samples_per_step
            if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
                record = {f"train/{k}": float(v) / steps_since_log for k, v in totals.items()}  # float() syncs
                elapsed = time.perf_counter() - t_log
                train_seconds += elapsed
                record.update({"train/grad_norm": grad_norm.item(), "train/lr": lr,
                               "tokens_per_s": steps_since_log * tokens_per_step / elapsed})
                if peak:  # model FLOP utilisation: the FLOPs the method needs per second, over the GPUs' peak
                    record["mfu"] = record["tokens_per_s"] * flops / peak
                log({"step": step + 1, "samples": samples, **record})
                bar.set_postfix_str(" ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in record.items() if k != "train/lr"))
                totals, t_log, steps_since_log = {}, time.perf_counter(), 0
            stop_if_signalled(stop, step + 1)  # before the evaluation: a pre-emption's grace period may be short
            t_pause = time.perf_counter()
            do_eval_now = crossed(cfg.eval_every, step + 1, cfg) and step + 1 < n_steps  # the last one is after the loop
            do_save_now = crossed(cfg.save_every, step + 1, cfg) and step + 1 < n_steps
            if do_eval_now:
                evaluate_and_log(step + 1)
            if do_save_now:
                checkpoint(step + 1)
            t_log += time.perf_counter() - t_pause  # evaluations and checkpoints do not count against tokens/s
            if do_eval_now or do_save_now:
                stop_if_signalled(stop, step + 1)  # a signal that came during them

    if start_step < n_steps:
        checkpoint(n_steps)  # the final evaluation can take minutes: a run stopped during it resumes here
    metrics = evaluate_and_log(n_steps)
    if not main_process:
        return metrics
    log_file.close()
    atomic_write(out / "sae.safetensors", lambda tmp: save_sae(sae, tmp))
    save_saelens(out, run_info)
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    for name in ("checkpoint.safetensors", "checkpoint.json"):  # the run is complete: sae.safetensors holds it
        (out / name).unlink(missing_ok=True)
    tokens_per_s = n_steps * tokens_per_step / train_seconds  # over all sessions of a resumed run
    print(f"trained on {n_steps * tokens_per_step:,} tokens in {train_seconds:.1f} s ({tokens_per_s:,.0f} tokens/s"
          + (f", MFU {tokens_per_s * flops / peak:.1%}" if peak else "") + ", evaluation excluded)")
    print(f"final: {format_metrics(metrics)}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
              + (" (rank 0)" if dist.is_initialized() else ""))
    print(f"wrote {out}/sae.safetensors, config.json, metrics.json, log.jsonl (and SAELens's cfg.json, sae_weights.safetensors)")
    return metrics


def crossed(every: int, step: int, cfg: Config) -> bool:
    """Did optimiser step `step` (counted from 1) pass a multiple of `every` training sequences?"""
    return every > 0 and (step * cfg.samples_per_step) % every < cfg.samples_per_step


def check_width(sae: SAE, model, cfg: Config):
    if sae.encoder.in_features != model.config.hidden_size:
        raise UserError(f"the SAE in {cfg.sae} reads width {sae.encoder.in_features}, but {cfg.model} has "
                        f"{model.config.hidden_size}")


def evaluate_saved(cfg: Config) -> dict:
    """--eval-only: evaluate the SAE in cfg.sae and write metrics.json into cfg.out_dir."""
    sae, _ = load_sae(cfg.sae)
    device, autocast, model, tokenizer, blocks = setup(cfg)
    check_width(sae, model, cfg)
    eval_tokens, _ = load_data(cfg, tokenizer, model.config.vocab_size)
    metrics = evaluate(model, blocks, sae.to(device), eval_tokens, cfg.layer, cfg.batch_size, autocast)
    if rank() == 0:
        out = make_out_dir(cfg.out_dir)
        atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
        print(f"{cfg.sae} at layer {cfg.layer} of {cfg.model}: {format_metrics(metrics)}")
        print(f"wrote {out}/metrics.json")
    return metrics


# -----------------------------------------------------------------------------
# Measuring speed


def flops_per_token(model, blocks, sae: SAE, loss: str, layer: int, n_ctx: int) -> int:
    """Matrix-multiply FLOPs of one training token (2 per multiply-add), from the shapes, for the work
    compute_loss does; elementwise work (norms, softmax, GELU) is left out, as is usual for MFU.
    Per token, with P the weights of one block's matmuls, n blocks, and T = n_ctx:
      block forward      2P + 4TD    (4TD: QKᵀ and the attention-weighted sum over all T keys; the full
                                      square, not the causal half, following PaLM's MFU convention)
      unembedding        2DV
      SAE forward        4DF         (encoder 2DF, decoder 2DF)
      SAE backward       6DF         (W_e's gradient; the decoder's gradients for c and for D_n. a is a
                                      constant, so the encoder computes no input gradient)
    The frozen model's backward computes input gradients only: 2P per block (1× the forward) and 8TD for
    attention (the gradients of both of its products).
      local    L blocks forward, the SAE forward and backward
      e2e(ds)  clean run (n blocks); spliced run from L (n − L blocks) and its backward; the SAE forward
               and backward; and three unembeddings in unembed_kl (both runs' logits, and the gradient
               (q − p) W_U). The downstream MSE adds no matmul."""
    D, F_, n = sae.encoder.in_features, sae.encoder.out_features, len(blocks)
    V = model.get_output_embeddings().weight.shape[0]
    P = sum(p.numel() for p in blocks[0].parameters() if p.ndim == 2)
    block_fwd, block_bwd = 2 * P + 4 * n_ctx * D, 2 * P + 8 * n_ctx * D
    head, sae_fwd, sae_bwd = 2 * D * V, 4 * D * F_, 6 * D * F_
    if loss == "local":
        return layer * block_fwd + sae_fwd + sae_bwd
    clean = n * block_fwd + head
    spliced = (n - layer) * (block_fwd + block_bwd) + 2 * head + sae_fwd + sae_bwd
    return clean + spliced


# Dense bf16 tensor-core peak of some GPUs in FLOP/s (vendor data sheets), for MFU. The first key found
# in torch.cuda.get_device_name() wins, so longer names come before their prefixes.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12, "H200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The bf16 peak in FLOP/s of the run's GPUs (under torchrun, all N of them), or None where unknown
    (CPU, fp32, a GPU not in the table)."""
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
    return peak and peak * world_size()


def benchmark(cfg: Config) -> dict:
    """--benchmark: optimiser steps exactly as train() takes them, on random tokens. Prints and returns
    tokens/s, FLOPs per token, achieved FLOP/s, MFU (on a GPU of known peak) and peak GPU memory."""
    device, autocast, model, _, blocks = setup(cfg)
    batch_size, main_process = local_batch_size(cfg), rank() == 0
    d_model, vocab_size = model.config.hidden_size, model.config.vocab_size
    torch.manual_seed(cfg.seed)
    sae = SAE(d_model, round(cfg.dict_ratio * d_model)).to(device)
    if cfg.compile:
        compile_forwards(sae, *blocks)
    step_sae = for_steps(sae, device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + rank())

    def step():
        micro_batches = [torch.randint(vocab_size, (batch_size, cfg.n_ctx), generator=g).to(device)  # (B / N, T)
                         for _ in range(cfg.grad_accum)]
        train_step(cfg, model, blocks, step_sae, optimizer, micro_batches, autocast)

    def sync():  # the GPU runs ahead of Python: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    say = print if main_process else lambda *args: None
    say(f"benchmark: {cfg.loss} at layer {cfg.layer} of {cfg.model} (D={d_model}, F={sae.encoder.out_features}) "
        f"| {cfg.grad_accum} × {cfg.batch_size} × {cfg.n_ctx} tokens per step | {device} {cfg.dtype}"
        f"{' compiled' if cfg.compile else ''} | {cfg.bench_warmup} warm-up + {cfg.bench_steps} timed steps"
        + (f" | {world_size()} processes of {batch_size} sequences per micro-batch" if dist.is_initialized() else ""))
    for _ in range(cfg.bench_warmup):  # compilation, the allocator's pools, cuBLAS's kernel choices
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steady state: Adam's moments exist by now
    t0 = time.perf_counter()
    for _ in range(cfg.bench_steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = cfg.bench_steps * cfg.samples_per_step * cfg.n_ctx / seconds  # over all processes
    flops = flops_per_token(model, blocks, sae, cfg.loss, cfg.layer, cfg.n_ctx)
    peak = peak_flops(device, cfg.dtype)
    result = {"tokens_per_s": tokens_per_s, "step_s": seconds / cfg.bench_steps, "flops_per_token": flops,
              "tflops_per_s": tokens_per_s * flops / 1e12, "mfu": tokens_per_s * flops / peak if peak else None,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None}
    say(f"tokens/s {tokens_per_s:,.0f} | {result['step_s'] * 1e3:.1f} ms per step | "
        f"{flops / 1e9:.3f} GFLOP per token (see flops_per_token) → {result['tflops_per_s']:.2f} TFLOP/s")
    say(f"MFU {result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s ({world_size()} × the bf16 peak of "
        f"{torch.cuda.get_device_name(device)})" if peak else
        "MFU: n/a (needs a GPU of known bf16 peak, see PEAK_BF16_FLOPS, and --dtype bf16)")
    say(f"peak GPU memory {result['peak_memory_gib']:.2f} GiB allocated, {result['peak_reserved_gib']:.2f} GiB "
        "reserved by PyTorch's allocator (timed steps" + (", rank 0)" if dist.is_initialized() else ")")
        if device.type == "cuda" else "peak GPU memory: n/a on the CPU")
    return result


# -----------------------------------------------------------------------------
# Looking inside: feature contexts, feature density, dictionary geometry

TOP_CONTEXTS, CONTEXT_TOKENS = 5, 8  # --inspect: contexts per element, and tokens shown on each side of the max


def text_histogram(edges: list, counts: list, label) -> str:
    """One line per bin from the first non-empty one to the last, with a bar scaled to the largest count."""
    full = [i for i, n in enumerate(counts) if n] or [0]
    rows = range(full[0], full[-1] + 1)
    return "\n".join(f"  {label(edges[i], edges[i + 1]):>18} {'█' * round(40 * counts[i] / max(counts + [1])):<40} "
                     f"{counts[i]}" for i in rows)


def density(fires: torch.Tensor, n_tokens: int) -> dict:
    """Histogram of log10 firing frequency over the dictionary (F,) in bins of 0.5 from log10(1/n_tokens),
    the rarest possible, up to 0; elements that never fired (log10 0 = −∞) are counted apart as dead."""
    log_freq = (fires[fires > 0].double() / n_tokens).log10()
    lowest = math.floor(2 * math.log10(1 / n_tokens)) / 2
    edges = torch.arange(lowest, 0.25, 0.5, dtype=torch.float64)
    counts = torch.histogram(log_freq, edges).hist.long() if len(edges) > 1 else torch.zeros(0, dtype=torch.long)
    return {"log10_freq_edges": edges.tolist(), "counts": counts.tolist(), "dead": int((fires == 0).sum())}


@torch.no_grad()
def inspect(cfg: Config) -> dict:
    """--inspect: the SAE in cfg.sae over the first N sequences, read a batch at a time. For every
    dictionary element it keeps a running top-TOP_CONTEXTS of (activation, sequence, position, the
    tokens around it), one per sequence, so memory is (TOP_CONTEXTS + B) × F × (2 CONTEXT_TOKENS + 1)
    token ids whatever N is. Then it prints the chosen elements' frequency, mean activation when active
    and top contexts (the max token «marked»), and the density histogram, and writes them to inspect.json."""
    sae, _ = load_sae(cfg.sae)
    F_, L, n, W = sae.encoder.out_features, cfg.layer, cfg.inspect_samples or cfg.eval_samples, CONTEXT_TOKENS
    try:
        chosen = [int(f) for f in cfg.features.split(",")] if cfg.features is not None else None
    except ValueError:
        raise UserError(f"--features takes comma-separated numbers, not {cfg.features!r}") from None
    if chosen and not all(0 <= f < F_ for f in chosen):
        raise UserError(f"--features {cfg.features}: the dictionary has elements 0 … {F_ - 1}")
    device, autocast, model, tokenizer, blocks = setup(cfg)
    check_width(sae, model, cfg)
    sae, vocab_size = sae.to(device), model.config.vocab_size
    fires = torch.zeros(F_, dtype=torch.long, device=device)  # tokens on which each element fired
    act_sum = torch.zeros(F_, dtype=torch.float64, device=device)  # Σ c over those tokens
    top = torch.full((TOP_CONTEXTS, F_), -1.0, device=device)  # the running top-k activations, (k, F)
    top_seq = torch.zeros((TOP_CONTEXTS, F_), dtype=torch.long, device=device)  # ... their sequences
    top_pos = torch.zeros((TOP_CONTEXTS, F_), dtype=torch.long, device=device)  # ... their positions
    top_win = torch.zeros((TOP_CONTEXTS, F_, 2 * W + 1), dtype=torch.long, device=device)  # ... and tokens
    stream, n_seqs = itertools.islice(sequences(cfg, tokenizer, vocab_size), n), 0
    while batch := list(itertools.islice(stream, cfg.batch_size)):
        batch = check_vocab(torch.stack(batch), vocab_size).to(device)  # (B, T)
        with autocast(), record_resid(blocks, [L], stop_at=L) as resid:
            run_model(model, batch)
        _, c = sae(resid[L])  # (B, T, F)
        c = c.float()
        fires += (c > 0).sum((0, 1))
        act_sum += c.sum((0, 1))
        best, pos = c.max(1)  # (B, F): each sequence's largest activation of each element, and where
        seq = torch.arange(n_seqs, n_seqs + len(batch), device=device)[:, None].expand_as(best)  # (B, F)
        padded = F.pad(batch, (W, W), value=-1)  # (B, W + T + W): −1 beyond the sequence's ends
        at = pos[:, :, None] + torch.arange(2 * W + 1, device=device)  # (B, F, 2W + 1)
        win = padded.gather(1, at.flatten(1)).view(at.shape)  # (B, F, 2W + 1): the tokens around each max
        top, keep = torch.cat([top, best]).topk(TOP_CONTEXTS, dim=0)  # (k, F): the best of the old top-k and B
        top_seq = torch.cat([top_seq, seq]).gather(0, keep)
        top_pos = torch.cat([top_pos, pos]).gather(0, keep)
        top_win = torch.cat([top_win, win]).gather(0, keep[:, :, None].expand(-1, -1, 2 * W + 1))
        n_seqs += len(batch)
    if n_seqs == 0:
        raise UserError(f"--dataset {cfg.dataset} holds no sequence of {cfg.n_ctx} tokens")
    n_tokens = n_seqs * cfg.n_ctx
    freq, top, top_seq, top_pos = (fires.double() / n_tokens).cpu(), top.cpu(), top_seq.cpu(), top_pos.cpu()
    chosen = chosen or freq.topk(min(cfg.top_features, F_)).indices.tolist()  # the most often firing
    show = (lambda i: tokenizer.decode([i]).replace("\n", "⏎")) if tokenizer else (lambda i: f" {i}")
    result = {"sae": str(cfg.sae), "n_sequences": n_seqs, "n_tokens": n_tokens,
              "density": density(fires.cpu(), n_tokens), "features": []}
    for f in chosen:
        contexts = []
        for j in range(TOP_CONTEXTS):
            if top[j, f] <= 0:
                break  # fired in fewer sequences
            window = top_win[j, f].tolist()
            mark = W - next(i for i, t in enumerate(window) if t != -1)  # the max token, once the −1s go
            window = [t for t in window if t != -1]
            pieces = [show(i) for i in window]
            word = pieces[mark].lstrip() or pieces[mark]  # the mark goes after the token's leading space: " «fox»"
            pieces[mark] = f"{pieces[mark][:len(pieces[mark]) - len(word)]}«{word}»"
            contexts.append({"activation": float(top[j, f]), "sequence": int(top_seq[j, f]),
                             "position": int(top_pos[j, f]), "tokens": window, "marked": mark, "text": "".join(pieces)})
        result["features"].append({"feature": f, "frequency": float(freq[f]), "contexts": contexts,
                                   "mean_activation": float(act_sum[f] / fires[f]) if fires[f] else 0.0})
    print(f"{cfg.sae} at layer {L} of {cfg.model}, over the first {n_seqs} sequences ({n_tokens:,} tokens)"
          + (f"; the dataset has no more than {n_seqs}" if n_seqs < n else "")
          + ("; beyond --eval-samples they include training data" if n_seqs > cfg.eval_samples else ""))
    for r in result["features"]:
        print(f"\nfeature {r['feature']}: fires on {r['frequency']:.3%} of tokens, mean activation when active "
              f"{r['mean_activation']:.3g}")
        for ctx in r["contexts"]:
            print(f"  {ctx['activation']:8.3f}  {ctx['text']}")
    d = result["density"]
    print(f"\nfiring frequency of the {F_} dictionary elements ({d['dead']} dead, never firing):")
    print(text_histogram(d["log10_freq_edges"], d["counts"], lambda lo, hi: f"10^{lo:.1f} … 10^{hi:.1f}"))
    out = make_out_dir(cfg.out_dir)
    atomic_write(out / "inspect.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {out}/inspect.json")
    return result


def max_cosine(A: torch.Tensor, B: torch.Tensor, exclude_self=False, chunk_elements=2**25) -> torch.Tensor:
    """For each unit-norm row of A (F_A, D), its largest cosine similarity with a row of B (F_B, D) → (F_A,).
    With exclude_self (B is A), an element is not compared with itself. The (F_A, F_B) matrix is made
    chunk_elements at a time: 128 MiB in fp32, where the whole would be 8 GiB at F = 46,080."""
    out = torch.empty(len(A), device=A.device)
    rows = max(1, chunk_elements // len(B))
    for i in range(0, len(A), rows):
        sims = A[i:i + rows] @ B.T  # (rows, F_B)
        if exclude_self:
            r = torch.arange(len(sims), device=A.device)
            sims[r, r + i] = -2.0  # below any cosine
        out[i:i + rows] = sims.max(1).values
    return out


@torch.no_grad()
def compare(cfg: Config) -> dict:
    """--compare DIR_A DIR_B: the geometry of two dictionaries (the paper compares e2e with local SAEs).
    Each element of A gets its largest cosine similarity with any element of B (cross-SAE: is it in B
    too?) and with any other element of A (within-SAE: how spread out is A?)."""
    (a, _), (b, _) = load_sae(cfg.compare[0]), load_sae(cfg.compare[1])
    device = usable_device(cfg)
    A, B = a.dictionary.T.to(device), b.dictionary.T.to(device)  # (F_A, D), (F_B, D): unit-norm rows
    if A.shape[1] != B.shape[1]:
        raise UserError(f"the SAEs read different widths ({A.shape[1]} and {B.shape[1]}): they cannot be compared")
    result = {"a": cfg.compare[0], "b": cfg.compare[1]}
    edges = [i / 20 for i in range(21)]  # [0, 1] in bins of 0.05; a maximum below 0 is counted apart
    pairs = [("cross", max_cosine(A, B))] + ([("within", max_cosine(A, A, exclude_self=True))] if len(A) > 1 else [])
    for name, values in pairs:  # (a dictionary of one element has no "within")
        v = values.double().clamp(-1, 1).cpu()  # rounding can take a cosine of 1 just above it
        q1, median, q3 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        result[name] = {"mean": v.mean().item(), "q1": q1, "median": median, "q3": q3, "min": v.min().item(),
                        "max": v.max().item(), "below_0": int((v < 0).sum()), "edges": edges,
                        "counts": torch.histogram(v[v >= 0], torch.tensor(edges, dtype=torch.float64)).hist.long().tolist(),
                        "values": v.tolist()}
        r = result[name]
        print(f"{name}-SAE max cosine similarity of A's {len(A)} elements with "
              f"{'any of B' if name == 'cross' else 'another of A'}'s: mean {r['mean']:.3f} | quartiles "
              f"{q1:.3f} {median:.3f} {q3:.3f} | min {r['min']:.3f} max {r['max']:.3f}")
        print(text_histogram(edges, r["counts"], lambda lo, hi: f"{lo:.2f} … {hi:.2f}"))
    out = make_out_dir(cfg.out_dir)
    atomic_write(out / "compare.json", lambda tmp: tmp.write_text(json.dumps(result) + "\n"))
    print(f"wrote {out}/compare.json")
    return result


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    try:
        cfg = parse_config(argv)
    except UserError as e:  # a mistake in the flags, which every process under torchrun was given alike
        if first_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        if launched_by_torchrun():
            join_processes(cfg)
        if (cfg.inspect or cfg.compare) and world_size() > 1:
            raise UserError("--inspect and --compare run in one process: start them with python, not torchrun")
        if cfg.compare:
            compare(cfg)
        elif cfg.inspect:
            inspect(cfg)
        elif cfg.benchmark:
            benchmark(cfg)
        elif cfg.eval_only:
            evaluate_saved(cfg)
        else:
            train(cfg)
        leave_processes()
    except UserError as e:
        # Under torchrun every process that meets an error says it, with its rank: the error may be its
        # own alone (its GPU, its view of the network or of the files).
        who = "" if first_process() else f" (rank {os.environ['RANK']})"
        print(f"error{who}: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # every process stopped after the same step; rank 0 wrote the checkpoint
        leave_processes()
        if first_process():
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C
        if first_process():
            print("stopped: interrupted (any checkpoint already written is intact)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
