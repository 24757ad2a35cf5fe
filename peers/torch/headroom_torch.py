#!/usr/bin/env python3
"""The PyTorch peer of headroom: the same cases, measured the way PyTorch users measure them.

Reads the case list that `headroom cases --format json` prints, builds for every case it
knows the equivalent PyTorch program (torch.matmul; scaled_dot_product_attention with the
flash backend, and the explicit softmax(QK^T)V; torch.utils.checkpoint; autocast to bf16;
gradient accumulation; AdamW), times it with CUDA events (time.perf_counter on the CPU),
takes its memory from torch.cuda.max_memory_allocated / max_memory_reserved, and writes one
report in headroom's schema (`headroom-report/1`, backend `torch`) that `headroom compare`
puts beside headroom's own.

The shard family (one training step data-parallel over W ranks: DDP, ZeRO-1 by
ZeroRedundancyOptimizer, ZeRO-2 by FSDP's SHARD_GRAD_OP, FSDP2 with and without resharding)
runs with torch.distributed, one launch per world size:
`torchrun --nproc_per_node W headroom_torch.py --cases cases.json --out DIR`.

Needs only PyTorch and the standard library. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import pickle
import random
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # PyTorch < 2.3
    SDPBackend = None  # type: ignore[assignment,misc]
    sdpa_kernel = None  # type: ignore[assignment]

SCHEMA = "headroom-report/1"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
SAME_AS_CUBLAS = "same as the cublas row"


class Skip(Exception):
    """The case cannot run here; the message is the reason."""


class Invalid(Exception):
    """The run produced something that cannot be right (a non-finite loss)."""


# ----------------------------------------------------------------------------------------
# Case ids


@dataclass(frozen=True)
class MatmulSpec:
    m: int
    n: int
    k: int


@dataclass(frozen=True)
class AttentionSpec:
    variant: str  # naive | flash
    backward: bool
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    # K and V heads (grouped-query attention when fewer than heads; each serves
    # heads // kv_heads query heads, in order).
    kv_heads: int


@dataclass(frozen=True)
class TrainSpec:
    checkpoint: str  # none | full | every<k> | selective
    attention: str  # naive | flash
    micro_batches: int
    layers: int
    hidden: int
    heads: int
    seq: int
    batch: int
    # The architecture beyond the stack's size (headroom's `Arch`, read from the shape's
    # suffix); the defaults are headroom's original GPT stack with no vocabulary.
    kv_heads: int = 0  # 0: as many as heads
    ffn: int = 0  # 0: 4 x hidden
    mlp: str = "gelu"  # gelu | swiglu
    norm: str = "layernorm"  # layernorm | rms
    bias: str = "all"  # all | qkv | none
    vocab: int = 0  # 0: no vocabulary, the loss is on the last hidden state
    tied: bool = False
    positions: int = 0
    # With a vocabulary: the head's loss, "materialized" or "chunked<rows>".
    head_loss: str = "materialized"

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn_size(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def every(self) -> int:
        """Blocks per checkpointed segment (1 for full; 0 when nothing is recomputed)."""
        if self.checkpoint == "full":
            return 1
        if self.checkpoint.startswith("every"):
            return max(1, min(int(self.checkpoint[5:]), self.layers))
        return 0


def parse_matmul(info: dict[str, Any]) -> MatmulSpec:
    m = re.fullmatch(r"m(\d+)-n(\d+)-k(\d+)", info["shape"])
    if not m:
        raise Skip(f"matmul form '{info['shape']}' is not reproduced in PyTorch (plain A·B only)")
    return MatmulSpec(*(int(g) for g in m.groups()))


def parse_attention(info: dict[str, Any]) -> AttentionSpec:
    m = re.fullmatch(r"(fwd|fwd\+bwd)/b(\d+)-h(\d+)-n(\d+)-d(\d+)(-causal)?(?:-kv(\d+))?",
                     info["shape"])
    if not m or info["technique"] not in ("naive", "flash"):
        raise Skip(f"attention case '{info['id']}' is not one the peer knows")
    heads = int(m.group(3))
    kv_heads = int(m.group(7)) if m.group(7) else heads
    if kv_heads < 1 or heads % kv_heads:
        raise Skip(f"attention case '{info['id']}' has {kv_heads} kv heads for {heads} heads")
    return AttentionSpec(
        variant=info["technique"],
        backward=m.group(1) == "fwd+bwd",
        batch=int(m.group(2)),
        heads=heads,
        seq=int(m.group(4)),
        head_dim=int(m.group(5)),
        causal=m.group(6) is not None,
        kv_heads=kv_heads,
    )


# The head-loss part of a training technique (headroom's HeadLoss::id; the chunk in tokens,
# 1024 when not named) and the default chunk.
DEFAULT_CHUNK_ROWS = 1024
FUSED_CE = ("PyTorch has no fused linear cross-entropy of its own (Liger-Kernel's and Cut "
            "Cross-Entropy's are separate packages); its peer is the materialized case")


def parse_arch(spec: TrainSpec, tokens: list[str]) -> Optional[TrainSpec]:
    """The architecture tokens of a training shape (headroom's parse_arch_token: kv<k>,
    ffn<f>, swiglu, rms, qkvbias, nobias, v<vocab>, tied, pos<rows>), or None for a token
    it does not know."""
    fields: dict[str, Any] = {}
    named = {"swiglu": ("mlp", "swiglu"), "rms": ("norm", "rms"), "qkvbias": ("bias", "qkv"),
             "nobias": ("bias", "none"), "tied": ("tied", True)}
    for tok in tokens:
        if tok in named:
            key, value = named[tok]
            fields[key] = value
            continue
        m = re.fullmatch(r"(kv|ffn|pos|v)(\d+)", tok)
        if not m:
            return None
        fields[{"kv": "kv_heads", "ffn": "ffn", "pos": "positions", "v": "vocab"}[m.group(1)]] = \
            int(m.group(2))
    return dataclasses.replace(spec, **fields)


def parse_train(info: dict[str, Any]) -> TrainSpec:
    t = re.fullmatch(r"(none|full|every\d+|selective)-(naive|flash)-mb(\d+)"
                     r"(?:-(materialized|chunked\d*|fused))?", info["technique"])
    s = re.fullmatch(r"L(\d+)-h(\d+)-heads(\d+)-n(\d+)-b(\d+)((?:-[a-z]+\d*)*)", info["shape"])
    if not t or not s:
        raise Skip(f"training case '{info['id']}' is not one the peer knows")
    if t.group(4) == "fused":
        raise Skip(FUSED_CE)
    head_loss = t.group(4) or "materialized"
    if head_loss == "chunked":
        head_loss = f"chunked{DEFAULT_CHUNK_ROWS}"
    base = TrainSpec(t.group(1), t.group(2), int(t.group(3)), *(int(g) for g in s.groups()[:5]),
                     head_loss=head_loss)
    spec = parse_arch(base, [tok for tok in s.group(6).split("-") if tok])
    if spec is None:
        raise Skip(f"training case '{info['id']}' has an architecture the peer does not know")
    if (spec.hidden % spec.heads or spec.batch % spec.micro_batches or spec.heads % spec.kv
            or (spec.vocab == 0 and (spec.tied or spec.positions or t.group(4)))
            or (spec.positions and spec.seq > spec.positions)
            or spec.head_loss == "chunked0"):
        raise Skip(f"training case '{info['id']}' has an impossible shape")
    return spec


# ----------------------------------------------------------------------------------------
# The device: synchronization, timing, memory


class Device:
    def __init__(self, name: str) -> None:
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"
        self.flush_buf: Optional[torch.Tensor] = None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.dev)
            l2 = int(getattr(props, "L2_cache_size", 0) or 64 << 20)
            # Written before every timed run, as headroom flushes the L2 (nvbench's habit).
            self.flush_buf = torch.empty(2 * l2 // 4, dtype=torch.float32, device=self.dev)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def time_once(self, fn: Callable[[], None]) -> float:
        """Seconds of one call: CUDA events on the GPU, the wall clock on the CPU."""
        if self.cuda:
            self.flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def measured(self, out: dict[str, Any]) -> Iterator[None]:
        """The memory region: peaks over what runs inside, relative to what was live before.

        Fills `out["memory"]` (None on the CPU, where PyTorch keeps no such statistics) even
        when the body raises, so an out-of-memory case still shows how far it got."""
        if not self.cuda:
            out["memory"] = None
            yield
            return
        self.release()
        torch.cuda.reset_peak_memory_stats(self.dev)
        base_alloc = torch.cuda.memory_allocated(self.dev)
        base_reserved = torch.cuda.memory_reserved(self.dev)

        def record() -> None:
            out["memory"] = {
                "peak_allocated": max(0, torch.cuda.max_memory_allocated(self.dev) - base_alloc),
                "peak_reserved": max(0, torch.cuda.max_memory_reserved(self.dev) - base_reserved),
            }

        try:
            yield
            self.sync()
        finally:
            record()


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(e, oom_type):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def uniform(shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device, scale: float = 1.0,
            requires_grad: bool = False) -> torch.Tensor:
    """U(-scale, scale) made directly in its dtype (no fp32 temporary in the peak)."""
    t = torch.empty(shape, dtype=dtype, device=dev).uniform_(-scale, scale)
    return t.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------
# Validation: max |out - ref| / max |ref| over the compared elements, as headroom's


class Comparison:
    def __init__(self) -> None:
        self.max_err = 0.0
        self.max_ref = 0.0
        self.compared = 0
        self.worst = ""
        self.non_finite: Optional[str] = None

    def all_finite(self, name: str, t: torch.Tensor) -> None:
        if self.non_finite is None and not bool(torch.isfinite(t).all()):
            self.non_finite = f"{name} has non-finite values"

    def add(self, out: torch.Tensor, ref: torch.Tensor, where: Callable[[int], str]) -> None:
        """Compares same-shaped tensors; `where` names the element at a flat index."""
        out = out.detach().to(torch.float64).flatten()
        ref = ref.detach().to(torch.float64).flatten()
        self.compared += out.numel()
        if out.numel() == 0:
            return
        err = (out - ref).abs()
        idx = int(err.argmax())
        e = float(err[idx])
        if e > self.max_err:
            self.max_err = e
            self.worst = f"{where(idx)}: {float(out[idx]):.6g} vs {float(ref[idx]):.6f}"
        self.max_ref = max(self.max_ref, float(ref.abs().max()))

    def finish(self, tolerance: float) -> dict[str, Any]:
        if self.non_finite is not None:
            return {"error": math.inf, "tolerance": tolerance, "compared": self.compared,
                    "detail": self.non_finite}
        error = self.max_err / self.max_ref if self.max_ref > 0 else self.max_err
        return {"error": error, "tolerance": tolerance, "compared": self.compared,
                "detail": f"worst {self.worst}" if self.worst else "exact"}


def passed(v: dict[str, Any]) -> bool:
    return math.isfinite(v["error"]) and v["error"] <= v["tolerance"]


def sample(n: int, count: int, rng: random.Random) -> list[int]:
    """Up to `count` distinct indices below n, always with the first and the last."""
    if n <= count:
        return list(range(n))
    return sorted({0, n - 1, *(rng.randrange(n) for _ in range(count))})


# ----------------------------------------------------------------------------------------
# The programs. Each has setup() (allocations that live across runs), run() (what is timed)
# and validate() (a dict in headroom's Validation shape, or None).


class Program:
    def __init__(self, dev: Device, info: dict[str, Any], rng: random.Random) -> None:
        self.dev = dev
        self.info = info
        self.rng = rng

    def setup(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def validate(self) -> Optional[dict[str, Any]]:
        return None


class CopyProgram(Program):
    """dst.copy_(src): PyTorch's device-to-device copy, the peer's bandwidth ceiling."""

    def setup(self) -> None:
        m = re.fullmatch(r"n(\d+)", self.info["shape"])
        if not m:
            raise Skip(f"copy case '{self.info['id']}' is not one the peer knows")
        n = int(m.group(1))
        dt = DTYPES[self.info["dtype"]]
        self.src = uniform((n,), dt, self.dev.dev)
        self.dst = torch.empty_like(self.src)

    def run(self) -> None:
        self.dst.copy_(self.src)

    def validate(self) -> dict[str, Any]:
        same = bool(torch.equal(self.dst, self.src))
        return {"error": 0.0 if same else math.inf, "tolerance": self.info["tolerance"],
                "compared": self.src.numel(), "detail": "exact" if same else "copy differs"}


class MatmulProgram(Program):
    """C = torch.matmul(A, B, out=C): cuBLAS(Lt) behind PyTorch; fp32 with TF32 off."""

    def setup(self) -> None:
        s = parse_matmul(self.info)
        dt, d = DTYPES[self.info["dtype"]], self.dev.dev
        self.a = uniform((s.m, s.k), dt, d)
        self.b = uniform((s.k, s.n), dt, d)
        self.c = torch.empty((s.m, s.n), dtype=dt, device=d)

    def run(self) -> None:
        torch.matmul(self.a, self.b, out=self.c)

    def validate(self) -> dict[str, Any]:
        """64 x 64 sampled output elements against float64 products of the stored inputs."""
        cmp = Comparison()
        cmp.all_finite("C", self.c)
        m, n = self.c.shape
        rows, cols = sample(m, 64, self.rng), sample(n, 64, self.rng)
        ri = torch.tensor(rows, device=self.c.device)
        ci = torch.tensor(cols, device=self.c.device)
        ref = self.a[ri].double() @ self.b[:, ci].double()
        cmp.add(self.c[ri][:, ci], ref,
                lambda i: f"C[{rows[i // len(cols)]},{cols[i % len(cols)]}]")
        return cmp.finish(self.info["tolerance"])


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, as in nanoGPT: materializes the N x N scores
    and probabilities in the inputs' dtype; autograd keeps the probabilities for backward."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        assert mask is not None
        scores = scores.masked_fill(mask, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    backends: list[Any]) -> torch.Tensor:
    """scaled_dot_product_attention restricted to `backends` (the flash one by default);
    fewer K/V heads than query heads go through SDPA's own grouped-query support."""
    assert sdpa_kernel is not None
    with sdpa_kernel(backends):
        if k.shape[1] == q.shape[1]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        except TypeError as e:
            raise Skip(f"this PyTorch ({torch.__version__}) has no enable_gqa in "
                       f"scaled_dot_product_attention (2.5 or newer): {one_line(e)}")


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, d] -> [B, Hkv * groups, N, d], each kv head repeated for its group of
    query heads, as Hugging Face's eager Llama attention does before the matmuls."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def causal_mask(n: int, dev: torch.device) -> torch.Tensor:
    """True above the diagonal: the future a query may not see."""
    return torch.ones((n, n), dtype=torch.bool, device=dev).triu_(1)


def flash_unavailable(dev: Device, dtype: torch.dtype) -> Optional[str]:
    if sdpa_kernel is None:
        return f"this PyTorch ({torch.__version__}) has no torch.nn.attention.sdpa_kernel"
    if dev.cuda and dtype == torch.float32:
        return ("PyTorch's flash SDPA backend (SDPBackend.FLASH_ATTENTION) takes only "
                "fp16/bf16 on CUDA; fp32 flash is unsupported")
    return None


class AttentionProgram(Program):
    def setup(self) -> None:
        s = self.spec = parse_attention(self.info)
        dt, d = DTYPES[self.info["dtype"]], self.dev.dev
        if s.variant == "flash":
            why = flash_unavailable(self.dev, dt)
            if why:
                raise Skip(why)
        shape = (s.batch, s.heads, s.seq, s.head_dim)
        kv_shape = (s.batch, s.kv_heads, s.seq, s.head_dim)
        self.q = uniform(shape, dt, d, requires_grad=s.backward)
        self.k = uniform(kv_shape, dt, d, requires_grad=s.backward)
        self.v = uniform(kv_shape, dt, d, requires_grad=s.backward)
        self.d_o = uniform(shape, dt, d) if s.backward else None
        self.mask = causal_mask(s.seq, d) if s.variant == "naive" and s.causal else None
        self.o: Optional[torch.Tensor] = None

    def run(self) -> None:
        s = self.spec
        self.o = None
        for t in (self.q, self.k, self.v):
            t.grad = None
        if s.variant == "naive":
            g = s.heads // s.kv_heads
            o = naive_attention(self.q, repeat_kv(self.k, g), repeat_kv(self.v, g), s.causal,
                                self.mask)
        else:
            try:
                o = flash_attention(self.q, self.k, self.v, s.causal,
                                    [SDPBackend.FLASH_ATTENTION])
            except RuntimeError as e:
                if is_oom(e):
                    raise
                raise Skip(f"PyTorch's flash SDPA backend refused the case: {one_line(e)}")
        if s.backward:
            o.backward(self.d_o)
        self.o = o.detach()

    def validate(self) -> dict[str, Any]:
        """Float64 references of two sampled kv heads and every query head of their groups:
        every row of O, dQ, dK and dV up to N = 1024 (dK and dV summed over the group);
        beyond, 16 sampled rows of O and dQ and the column sums of dV (sum_j dV_j = the
        group's sum_i dO_i, since every probability row sums to one), as headroom's
        validation."""
        s = self.spec
        assert self.o is not None
        cmp = Comparison()
        cmp.all_finite("O", self.o)
        if s.backward:
            for name, t in (("dQ", self.q), ("dK", self.k), ("dV", self.v)):
                assert t.grad is not None
                cmp.all_finite(name, t.grad)
        scale = 1.0 / math.sqrt(s.head_dim)
        n, g, d = s.seq, s.heads // s.kv_heads, s.head_dim

        def at(name: str, row_of: list[int], head: int) -> Callable[[int], str]:
            return lambda i: f"{name}[head {head}][{row_of[i // d]},{i % d}]"

        for bk in sample(s.batch * s.kv_heads, 2, self.rng):
            b, hk = divmod(bk, s.kv_heads)
            k, v = (t.detach()[b, hk].double() for t in (self.k, self.v))
            full = n <= 1024
            rows = list(range(n)) if full else sample(n, 16, self.rng)
            ri = torch.tensor(rows, device=k.device)
            d_k = torch.zeros_like(k)
            d_v = torch.zeros_like(v)
            d_o_sum = torch.zeros(d, dtype=torch.float64, device=k.device)
            for h in range(hk * g, (hk + 1) * g):
                bh = b * s.heads + h
                q = self.q.detach()[b, h].double()
                sc = (q[ri] @ k.T) * scale
                if s.causal:
                    future = torch.arange(n, device=q.device)[None, :] > ri[:, None]
                    sc = sc.masked_fill(future, float("-inf"))
                p = torch.softmax(sc, dim=-1)
                o_ref = p @ v
                cmp.add(self.o[b, h][ri], o_ref, at("O", rows, bh))
                if not s.backward:
                    continue
                assert self.d_o is not None and self.q.grad is not None
                d_o = self.d_o[b, h].double()
                delta = (d_o[ri] * o_ref).sum(-1, keepdim=True)
                ds = p * (d_o[ri] @ v.T - delta)
                cmp.add(self.q.grad[b, h][ri], scale * ds @ k, at("dQ", rows, bh))
                if full:
                    d_k += scale * ds.T @ q
                    d_v += p.T @ d_o
                else:
                    d_o_sum += d_o.sum(0)
            if not s.backward:
                continue
            assert self.k.grad is not None and self.v.grad is not None
            kv = b * s.kv_heads + hk
            if full:
                cmp.add(self.k.grad[b, hk], d_k, at("dK", rows, kv))
                cmp.add(self.v.grad[b, hk], d_v, at("dV", rows, kv))
            else:
                cmp.add(self.v.grad[b, hk].double().sum(0), d_o_sum,
                        lambda c: f"sum_j dV[kv head {kv}][{c}]")
        return cmp.finish(self.info["tolerance"])


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, for a PyTorch older than nn.RMSNorm (2.4)."""

    def __init__(self, c: int, eps: float, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype) \
            * self.weight


def make_norm(spec: TrainSpec, c: int, dev: torch.device) -> nn.Module:
    """headroom's norm of the architecture (eps 1e-5): LayerNorm with weight and bias, or
    RMSNorm with a weight only."""
    if spec.norm == "rms":
        if hasattr(nn, "RMSNorm"):
            return nn.RMSNorm(c, eps=1e-5, device=dev)
        return RMSNorm(c, 1e-5, dev)
    return nn.LayerNorm(c, eps=1e-5, device=dev)


class Block(nn.Module):
    """One pre-norm block as headroom's model: separate q/k/v projections (k and v to the
    kv heads), causal attention, an MLP (GELU (tanh) of fc/fc2, or SwiGLU's
    down(silu(gate)·up)), biases and norms as the architecture says; `selective` checkpoints
    only the attention core."""

    def __init__(self, spec: TrainSpec, dev: torch.device, attention: Callable[..., torch.Tensor],
                 selective: bool) -> None:
        super().__init__()
        c, f = spec.hidden, spec.ffn_size
        kv = spec.kv * (c // spec.heads)
        qkv_bias, all_bias = spec.bias != "none", spec.bias == "all"
        self.heads, self.kv_heads = spec.heads, spec.kv
        self.attention = attention
        self.selective = selective
        self.swiglu = spec.mlp == "swiglu"
        self.ln1 = make_norm(spec, c, dev)
        self.q = nn.Linear(c, c, bias=qkv_bias, device=dev)
        self.k = nn.Linear(c, kv, bias=qkv_bias, device=dev)
        self.v = nn.Linear(c, kv, bias=qkv_bias, device=dev)
        self.proj = nn.Linear(c, c, bias=all_bias, device=dev)
        self.ln2 = make_norm(spec, c, dev)
        if self.swiglu:
            self.gate = nn.Linear(c, f, bias=all_bias, device=dev)
            self.up = nn.Linear(c, f, bias=all_bias, device=dev)
            self.down = nn.Linear(f, c, bias=all_bias, device=dev)
        else:
            self.fc = nn.Linear(c, f, bias=all_bias, device=dev)
            self.fc2 = nn.Linear(f, c, bias=all_bias, device=dev)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = q.shape
        return self.attention(q, k, v).transpose(1, 2).reshape(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        h = self.ln1(x)
        q = self.q(h).view(b, n, self.heads, d).transpose(1, 2)
        k, v = (lin(h).view(b, n, self.kv_heads, d).transpose(1, 2) for lin in (self.k, self.v))
        if self.selective:
            a = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            a = self.core(q, k, v)
        x = x + self.proj(a)
        h = self.ln2(x)
        if self.swiglu:
            return x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x + self.fc2(F.gelu(self.fc(h), approximate="tanh"))


def make_attention(spec: TrainSpec, dev: torch.device) -> Callable[..., torch.Tensor]:
    """The causal attention core of a training step: the written-out softmax(QK^T)V, or SDPA
    with the flash backend (the memory-efficient one standing in where flash has no kernel)."""
    if spec.attention == "naive":
        mask = causal_mask(spec.seq, dev)

        def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            groups = q.shape[1] // k.shape[1]
            return naive_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), True, mask)
        return naive
    if sdpa_kernel is None:
        raise Skip(f"this PyTorch ({torch.__version__}) has no sdpa_kernel")
    # fp32 on CUDA has no flash kernel: the memory-efficient one (also linear in N, also
    # keeps only the logsumexp) stands in, as SDPA itself would choose.
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention(q, k, v, True, backends)
    return flash


class Stack(nn.Module):
    """headroom's block stack with its checkpointing: every k-block segment (the last one
    too) under non-reentrant `checkpoint`, or the attention core only (`selective`). With a
    vocabulary, also the token embedding (and learned positions), the final norm and the LM
    head (bias-free, or the embedding's table when tied), which `embed` and `head_weight`
    give to the step; `forward` is the blocks alone."""

    def __init__(self, spec: TrainSpec, dev: torch.device, params_on: torch.device) -> None:
        """`dev` is where it computes (the causal mask lives there), `params_on` where its
        parameters are made."""
        super().__init__()
        self.spec = spec
        attention = make_attention(spec, dev)
        self.blocks = nn.ModuleList(
            Block(spec, params_on, attention, spec.checkpoint == "selective")
            for _ in range(spec.layers))
        if spec.vocab:
            c = spec.hidden
            self.embedding = nn.Embedding(spec.vocab, c, device=params_on)
            self.positions = (nn.Embedding(spec.positions, c, device=params_on)
                              if spec.positions else None)
            self.norm = make_norm(spec, c, params_on)
            self.head = (None if spec.tied
                         else nn.Linear(c, spec.vocab, bias=False, device=params_on))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return x

    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.head is None else self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, blocks = self.spec, self.blocks
        k = s.every
        if k == 0:
            for blk in blocks:
                x = blk(x)
            return x

        def segment(start: int, end: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(y: torch.Tensor) -> torch.Tensor:
                for blk in blocks[start:end]:
                    y = blk(y)
                return y
            return run

        # Every segment is checkpointed, the last one too (torch's checkpoint_sequential
        # runs its last segment without): only segment inputs are kept, as headroom does.
        for start in range(0, s.layers, k):
            x = checkpoint(segment(start, min(start + k, s.layers)), x, use_reentrant=False)
        return x


IGNORE_INDEX = -100  # cross_entropy's default, headroom's IGNORE_INDEX


def build_stack(spec: TrainSpec, dev: torch.device,
                move: bool = True) -> tuple[Stack, torch.Tensor, Optional[torch.Tensor]]:
    """The stack with headroom's initialization and the global batch of inputs, drawn from
    the CPU's generator in a fixed order, so that every rank of a sharded case and the
    single-process reference draw the same weights and inputs from the same seed; moved to
    `dev` unless `move` is False (FSDP moves and shards a CPU model block by block, so that
    no rank ever holds the whole model on its device, as FSDP users initialize).

    The inputs are hidden states [B, N, C], or with a vocabulary token ids [B, N] and their
    targets (headroom's: the next token, IGNORE_INDEX after a sequence's last token and at
    one token in 16)."""
    cpu = torch.device("cpu")
    stack = Stack(spec, dev, cpu)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "norm.weight")):
                p.uniform_(0.9, 1.1)
            elif p.dim() == 2:
                p.uniform_(-0.0346, 0.0346)  # std 0.02, as headroom's init
            else:
                p.uniform_(-0.02, 0.02)
    targets: Optional[torch.Tensor] = None
    if spec.vocab:
        x = torch.randint(0, spec.vocab, (spec.batch, spec.seq), device=cpu)
        targets = torch.full_like(x, IGNORE_INDEX)
        targets[:, :-1] = x[:, 1:]
        targets[torch.randint(0, 16, x.shape, device=cpu) == 0] = IGNORE_INDEX
    else:
        x = uniform((spec.batch, spec.seq, spec.hidden), torch.float32, cpu)
    if move:
        stack.to(dev)
        x = x.to(dev)
        targets = None if targets is None else targets.to(dev)
    return stack, x, targets


def lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            head_loss: str) -> torch.Tensor:
    """Σ cross-entropy of the logits h·weightᵀ over the targets that are not IGNORE_INDEX
    (h [T, C], targets [T]). materialized: F.cross_entropy on all T rows of logits (autocast
    runs it in fp32, so the upcast logits are what autograd keeps); chunked<rows>: rows
    tokens at a time, each chunk under non-reentrant `checkpoint` so that its logits are
    freed after its loss and made again in the backward."""
    def chunk_loss(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(hc, weight), tc, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    if head_loss == "materialized":
        return chunk_loss(h, targets)
    rows = int(head_loss[len("chunked"):])
    total = h.new_zeros((), dtype=torch.float32)
    for t0 in range(0, h.shape[0], rows):
        total = total + checkpoint(chunk_loss, h[t0:t0 + rows], targets[t0:t0 + rows],
                                   use_reentrant=False)
    return total


ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def adamw_with_moments(make: Callable[..., Any], params: list[nn.Parameter]) -> Any:
    """`make(**options)` an AdamW (fused where this PyTorch offers it for the parameters,
    else the default foreach one) and step it once on zero gradients, so its moments exist
    from the start as headroom allocates them in its setup (the step moves the weights only
    by weight decay)."""
    def warm(opt: Any) -> Any:
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return opt

    try:
        return warm(make(fused=True, **ADAMW))
    except (RuntimeError, TypeError, ValueError) as e:
        if is_oom(e):
            raise
        return warm(make(**ADAMW))


class TrainProgram(Program):
    """One optimizer step of headroom's block stack: zero_grad(set_to_none=True), forward and
    backward over the micro-batches (gradients accumulated), AdamW (fused where offered).
    The loss is ½·Σy²/numel on the last hidden state, or with a vocabulary the mean
    cross-entropy over the global batch's counted targets (`lm_loss`)."""

    def setup(self) -> None:
        s = self.spec = parse_train(self.info)
        self.dtype = DTYPES[self.info["dtype"]]
        self.stack, self.x, self.targets = build_stack(s, self.dev.dev)
        # The targets that count toward the mean (read here, not in the timed step).
        self.counted = (0 if self.targets is None
                        else max(int((self.targets != IGNORE_INDEX).sum()), 1))
        self.blocks = self.stack.blocks
        params = list(self.stack.parameters())
        self.opt = adamw_with_moments(lambda **kw: torch.optim.AdamW(params, **kw), params)
        self.total: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)

    def run(self) -> None:
        s = self.spec
        self.opt.zero_grad(set_to_none=True)
        numel = s.batch * s.seq * s.hidden
        total = torch.zeros((), device=self.dev.dev)
        autocast = (torch.autocast(self.dev.dev.type, dtype=torch.bfloat16)
                    if self.dtype == torch.bfloat16 else contextlib.nullcontext())
        xs = self.x.chunk(s.micro_batches, dim=0)
        targets = (self.targets.chunk(s.micro_batches, dim=0) if self.targets is not None
                   else [None] * len(xs))
        for x, tgt in zip(xs, targets):
            with autocast:
                if tgt is not None:
                    h = self.stack.norm(self.forward(self.stack.embed(x)))
                    # The mean over the global batch's counted targets: micro-batches add up.
                    loss = lm_loss(h.reshape(-1, s.hidden), self.stack.head_weight(),
                                   tgt.reshape(-1), s.head_loss) / self.counted
                else:
                    y = self.forward(x)
            if tgt is None:
                # L = ½·Σy²/numel over the global batch, so micro-batches add up to it.
                loss = 0.5 * y.float().square().sum() / numel
            loss.backward()
            total += loss.detach()
        self.opt.step()
        self.total = total

    def validate(self) -> None:
        """No reference step here (headroom's own check compares the gradients): a loss that
        is not finite is what this catches, and with a vocabulary a mean cross-entropy far
        from ln(V), which logits as small as headroom's initialization makes them (std 0.02
        weights) cannot give: ln(V) plus half their variance, under 1 for these models."""
        assert self.total is not None
        loss = float(self.total)
        if not math.isfinite(loss):
            raise Invalid(f"the loss is {loss}")
        v = self.spec.vocab
        if v and not 0.5 * math.log(v) < loss < 1.5 * math.log(v):
            raise Invalid(f"the mean cross-entropy is {loss:.4g}, not near ln({v}) = "
                          f"{math.log(v):.4g}, what near-uniform logits at initialization give")


# ----------------------------------------------------------------------------------------
# The shard family: one training step data-parallel over W ranks with torch.distributed

STRATEGIES = ("ddp", "zero1", "zero2", "fsdp", "fsdp-noreshard")
DEFAULT_BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb (25 MiB), headroom's default
SHARD_ID_FORM = ("shard/<strategy>-<checkpoint>-<attention>-mb<k>/<dtype>/L<layers>-h<hidden>-"
                 "heads<heads>-n<seq>-b<global batch>-w<world>[-bk<bucket bytes>][-x<bytes>]")
# The comparison of a sharded step with the single-process reference (max |Δ| / max |ref|
# over the gradients of the global batch and over the updated weights, each tensor group
# against its own largest reference magnitude):
# - fp32: 1e-5. Both compute the same sums in fp32, in another order (per-rank partial sums
#   averaged by the collective, against one process accumulating the micro-batches); fp32
#   rounding (2^-24 relative) over a few thousand terms stays two orders of magnitude below.
# - bf16: 5e-2, headroom's bf16 gradient tolerance. DDP and ZeRO run the same autocast
#   program as the reference, but the FSDP strategies run MixedPrecisionPolicy, which casts
#   every parameter and activation to bf16 (LayerNorm, softmax and the residual stream too,
#   which autocast keeps in fp32), so gradients differ by a few bf16 roundings (2^-9) per
#   block.
SHARD_TOLERANCE = {"f32": 1e-5, "bf16": 5e-2}


@dataclass(frozen=True)
class ShardSpec:
    strategy: str  # one of STRATEGIES
    train: TrainSpec  # the model, policy and GLOBAL batch
    world: int
    bucket_bytes: int
    rank0_extra: int

    @property
    def local_batch(self) -> int:
        return self.train.batch // self.world


def parse_shard(info: dict[str, Any]) -> ShardSpec:
    """A shard case's strategy, policy and shape, or Skip with what is wrong with the id."""
    ident = info.get("id", "?")

    def bad(why: str) -> Skip:
        return Skip(f"shard case '{ident}' is malformed: {why} (the form is {SHARD_ID_FORM})")

    # The technique is read from the right: checkpoint, attention and mbK are its last three
    # parts, as the train family's technique; the strategy (which may hold a dash) is before.
    parts = str(info.get("technique", "")).split("-")
    if len(parts) < 4:
        raise bad(f"technique '{info.get('technique')}' is not "
                  "<strategy>-<checkpoint>-<attention>-mb<k>")
    strategy = "-".join(parts[:-3])
    if strategy not in STRATEGIES:
        raise bad(f"'{strategy}' is not a strategy the peer knows ({', '.join(STRATEGIES)})")
    t = re.fullmatch(r"(none|full|every[1-9]\d*|selective)-(naive|flash)-mb([1-9]\d*)",
                     "-".join(parts[-3:]))
    if not t:
        raise bad(f"'{'-'.join(parts[-3:])}' is not <none|full|every<k>|selective>-"
                  "<naive|flash>-mb<k>")
    s = re.fullmatch(r"L(\d+)-h(\d+)-heads(\d+)-n(\d+)-b(\d+)-w(\d+)(?:-bk(\d+))?(?:-x(\d+))?",
                     str(info.get("shape", "")))
    if not s:
        raise bad(f"shape '{info.get('shape')}' is not L<layers>-h<hidden>-heads<heads>-n<seq>-"
                  "b<global batch>-w<world>[-bk<bucket bytes>][-x<rank0 extra bytes>]")
    layers, hidden, heads, seq, batch, world = (int(g) for g in s.groups()[:6])
    bucket = int(s.group(7)) if s.group(7) is not None else DEFAULT_BUCKET_BYTES
    extra = int(s.group(8)) if s.group(8) is not None else 0
    train = TrainSpec(t.group(1), t.group(2), int(t.group(3)), layers, hidden, heads, seq, batch)
    if min(layers, hidden, heads, seq, batch) == 0:
        raise bad("layers, hidden, heads, sequence length and batch must all be at least 1")
    if hidden % heads:
        raise bad(f"a hidden size of {hidden} does not split into {heads} heads")
    if world == 0:
        raise bad("a world of 0 ranks has no one to train")
    if batch % world:
        raise bad(f"a global batch of {batch} sequences does not split evenly over {world} ranks")
    if (batch // world) % train.micro_batches:
        raise bad(f"a rank's {batch // world} sequences do not split into "
                  f"{train.micro_batches} micro-batches")
    if bucket == 0:
        raise bad("a bucket of 0 bytes holds no gradient")
    return ShardSpec(strategy, train, world, bucket, extra)


def needs_ranks(world: int) -> str:
    if world == 1:
        return "needs 1 rank; run without torchrun or under torchrun --nproc_per_node 1"
    return f"needs {world} ranks; run under torchrun --nproc_per_node {world}"


# How a rank that waited at a collective for a failed one reports it (gloo, NCCL).
WAITED = re.compile(r"timed out|timeout|pair closure|connection (reset|closed)|"
                    r"NCCL communicator was aborted", re.IGNORECASE)


class Fatal(Exception):
    """The ranks can no longer agree (a control collective failed): the run cannot go on."""


class Agreed(Exception):
    """Every rank agreed that the case ends here with this status and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Dist:
    """The process group this run trains in, and a gloo group of its own for agreeing on
    every case's outcome (on the CPU, with its own timeout, so that a rank whose step failed
    can tell the others even while the training group is stuck)."""

    rank: int
    world: int
    launched: bool  # under torchrun (WORLD_SIZE/RANK in the environment)
    backend: str  # nccl on CUDA, gloo on the CPU
    timeout: float
    ctrl: Any = None
    work: Any = None
    generation: int = 0  # how many times `work` was replaced

    def renew(self) -> None:
        """A fresh training group, after a case failed: a collective that failed or timed
        out leaves its group unusable (its ranks are no longer at the same collective). The
        old one is not destroyed, since objects of the failed case may still name it."""
        self.work = dist.new_group(backend=self.backend, timeout=timedelta(seconds=self.timeout))
        self.generation += 1

    def gather(self, item: Any) -> list[Any]:
        """Every rank's picklable `item`, in rank order, over the control group. (Written
        out rather than all_gather_object, which needs NumPy in some PyTorch builds: the
        peer needs only PyTorch.)"""
        try:
            data = torch.frombuffer(bytearray(pickle.dumps(item)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, size, group=self.ctrl)
            longest = max(int(s) for s in sizes)
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[:data.numel()] = data
            parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(parts, padded, group=self.ctrl)
        except Exception as e:  # noqa: BLE001 - a lost rank ends the run, recorded
            raise Fatal(f"the ranks could not agree (a rank is gone or stuck): {one_line(e)}")
        return [pickle.loads(bytes(p[:int(n)].tolist()))
                for p, n in zip(parts, sizes)]

    def share(self, item: Any) -> Any:
        """Rank 0's `item` on every rank."""
        return self.gather(item)[0]

    def agree(self, failure: Optional[tuple[str, str]]) -> None:
        """Raises Agreed on every rank when any rank failed: the root cause first (an OOM or
        a refusal before an error such as another rank's collective timing out)."""
        fails = [(r, f) for r, f in enumerate(self.gather(failure)) if f is not None]
        if not fails:
            return
        order = {"oom": 0, "skipped": 1, "invalid": 2, "error": 3}

        def cause(rf: tuple[int, tuple[str, str]]) -> tuple[int, bool, int]:
            # A rank that waited in vain for one that failed reports a timeout or a closed
            # connection: the failure it waited for is the one to record.
            waited = bool(WAITED.search(rf[1][1]))
            return (order.get(rf[1][0], 4), waited, rf[0])

        r, (status, message) = min(fails, key=cause)
        if self.world > 1:
            message = f"rank {r}: {message}"
        raise Agreed(status, message)

    def phase(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on this rank, then agrees with the others on whether every rank got
        through it; every rank leaves a failed phase by the same Agreed exception."""
        failure: Optional[tuple[str, str]] = None
        result = None
        try:
            result = fn()
        except Skip as e:
            failure = ("skipped", str(e))
        except Invalid as e:
            failure = ("invalid", str(e))
        except Exception as e:  # noqa: BLE001 - every failure is agreed on and recorded
            failure = ("oom" if is_oom(e) else "error", one_line(e))
        self.agree(failure)
        return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_dist(dev: Device, timeout: float) -> Dist:
    """The training group: torchrun's (env://) when launched by it, else a world of one in
    this process (tcp on 127.0.0.1), for the shard cases of w1."""
    backend = "nccl" if dev.cuda else "gloo"
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    td = timedelta(seconds=timeout)
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend, timeout=td)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, timeout=td)
    d = Dist(dist.get_rank(), dist.get_world_size(), launched, backend, timeout)
    # The control group outlives a training collective's timeout, so that a rank stuck in
    # one still reaches the agreement after it times out.
    d.ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout + 60))
    # The group the shard cases train in, one for all of them until a case fails.
    d.work = dist.new_group(backend=backend, timeout=td)
    return d


def fsdp2_api() -> tuple[Any, Any]:
    """fully_shard and MixedPrecisionPolicy: public since PyTorch 2.6, composable before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
                MixedPrecisionPolicy, fully_shard)
        except ImportError:
            raise Skip(f"this PyTorch ({torch.__version__}) has no FSDP2 fully_shard") from None
    return fully_shard, MixedPrecisionPolicy


def fsdp1_api() -> Optional[tuple[Any, Any, Any, Any]]:
    """FSDP1's wrapper, ShardingStrategy, MixedPrecision and ModuleWrapPolicy, if present."""
    try:
        from torch.distributed.fsdp import (FullyShardedDataParallel, MixedPrecision,
                                            ShardingStrategy)
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    except ImportError:
        return None
    if not hasattr(ShardingStrategy, "SHARD_GRAD_OP"):
        return None
    return FullyShardedDataParallel, ShardingStrategy, MixedPrecision, ModuleWrapPolicy


def param_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP's `module.`, FSDP1's
    `_fsdp_wrapped_module.`), as the plain stack names it."""
    for wrapper in ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


class ShardRun:
    """One rank's side of a shard case: build, wrap, step, gather for validation."""

    def __init__(self, dev: Device, d: Dist, spec: ShardSpec, dtype: str, seed: int,
                 group: Any) -> None:
        self.dev, self.d, self.spec, self.seed, self.group = dev, d, spec, seed, group
        self.bf16 = dtype == "bf16"
        self.extra: Optional[torch.Tensor] = None
        self.model: Any = None
        self.opt: Any = None
        self.total: Optional[torch.Tensor] = None
        self.fsdp1: Any = None  # FSDP1's class, where zero2 runs under it
        self.implementation = ""

    def build(self) -> None:
        """Local work only: rank 0's extra bytes, then the stack and this rank's inputs."""
        s = self.spec
        if self.d.rank == 0 and s.rank0_extra > 0:
            # What rank 0 keeps besides the step (metrics, logging): alive through the case.
            self.extra = torch.empty(s.rank0_extra, dtype=torch.uint8, device=self.dev.dev)
        torch.manual_seed(self.seed)
        replicated = s.strategy in ("ddp", "zero1")
        # DDP replicates the model: it is built on the device. FSDP shards a CPU model.
        self.stack, x, _ = build_stack(s.train, self.dev.dev, move=replicated)
        r = self.d.rank
        self.x = x[r * s.local_batch:(r + 1) * s.local_batch].to(self.dev.dev, copy=True)
        del x

    def wrap(self) -> None:
        """The strategy as a PyTorch user writes it (collectives: parameter broadcast,
        sharding), the optimizer and its warm-up step on zero gradients."""
        s, d, dev = self.spec, self.d, self.dev.dev
        bf16 = torch.bfloat16
        if s.strategy in ("ddp", "zero1"):
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = None
            if self.dev.cuda:
                ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
            self.model = DDP(self.stack, device_ids=ids,
                             process_group=self.group, bucket_cap_mb=s.bucket_bytes / 2**20)
            params = list(self.model.parameters())
            if s.strategy == "ddp":
                self.opt = adamw_with_moments(lambda **kw: torch.optim.AdamW(params, **kw),
                                              params)
                self.implementation = "DistributedDataParallel"
            else:
                from torch.distributed.optim import ZeroRedundancyOptimizer
                self.opt = adamw_with_moments(
                    lambda **kw: ZeroRedundancyOptimizer(
                        params, optimizer_class=torch.optim.AdamW, process_group=self.group,
                        **kw), params)
                self.implementation = ("DistributedDataParallel + ZeroRedundancyOptimizer"
                                       "(optimizer_class=AdamW)")
            self.implementation += (f", bucket_cap_mb={s.bucket_bytes / 2**20:g}, no_sync() "
                                    "on all but the last micro-batch")
            if self.bf16:
                self.implementation += ", bf16 by autocast"
            return
        fsdp1 = fsdp1_api() if s.strategy == "zero2" else None
        if fsdp1 is not None:
            fsdp, sharding, mixed, wrap_policy = fsdp1
            mp = mixed(param_dtype=bf16, reduce_dtype=torch.float32) if self.bf16 else None
            self.model = fsdp(self.stack, process_group=self.group,
                              sharding_strategy=sharding.SHARD_GRAD_OP,
                              auto_wrap_policy=wrap_policy({Block}), mixed_precision=mp,
                              device_id=dev, use_orig_params=True)
            self.fsdp1 = fsdp
            self.implementation = ("FSDP1 FullyShardedDataParallel(sharding_strategy="
                                   "ShardingStrategy.SHARD_GRAD_OP, auto_wrap_policy="
                                   "ModuleWrapPolicy({Block}), use_orig_params=True)")
            if self.bf16:
                self.implementation += (", bf16 by MixedPrecision(param_dtype=bfloat16, "
                                        "reduce_dtype=float32)")
        else:
            fully_shard, policy = fsdp2_api()
            reshard = s.strategy == "fsdp"
            kw: dict[str, Any] = {"reshard_after_forward": reshard}
            if self.group is not None:
                from torch.distributed.device_mesh import DeviceMesh
                # DeviceMesh compares equal by its ranks and names, not its group, so DTensor's
                # caches would hand a mesh of a replaced group to a later case: each
                # generation of the training group names its mesh dimension apart.
                kw["mesh"] = DeviceMesh.from_group(self.group, dev.type,
                                                   mesh_dim_names=(f"dp{d.generation}",))
            if self.bf16:
                kw["mp_policy"] = policy(param_dtype=bf16, reduce_dtype=torch.float32)
            for blk in self.stack.blocks:
                fully_shard(blk, **kw)
            self.model = fully_shard(self.stack, **kw)
            self.fsdp1 = None
            self.implementation = (f"FSDP2 fully_shard(reshard_after_forward={reshard}) on "
                                   "every block, then on the root")
            if s.strategy == "zero2":
                self.implementation += (" (this PyTorch has no FSDP1 SHARD_GRAD_OP; FSDP2 "
                                        "without resharding stands in)")
            if self.bf16:
                self.implementation += (", bf16 by MixedPrecisionPolicy(param_dtype=bfloat16, "
                                        "reduce_dtype=float32)")
        self.implementation += ", gradients reduce-scattered after every micro-batch"
        params = list(self.model.parameters())
        self.opt = adamw_with_moments(lambda **kw: torch.optim.AdamW(params, **kw), params)

    def autocast(self) -> Any:
        if self.bf16 and self.spec.strategy in ("ddp", "zero1"):
            return torch.autocast(self.dev.dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> None:
        """zero_grad, forward and backward per micro-batch, the optimizer's step. Each rank's
        loss is W · ½Σy²/numel(global batch): DDP and FSDP average gradients over the ranks,
        so the average of W times each rank's share is the global batch's gradient."""
        s = self.spec
        t = s.train
        self.opt.zero_grad(set_to_none=True)
        numel = t.batch * t.seq * t.hidden
        total = torch.zeros((), device=self.dev.dev)
        chunks = self.x.chunk(t.micro_batches, dim=0)
        for j, x in enumerate(chunks):
            sync = (j == len(chunks) - 1 or s.strategy not in ("ddp", "zero1"))
            with (contextlib.nullcontext() if sync else self.model.no_sync()):
                with self.autocast():
                    y = self.model(x)
                loss = s.world * 0.5 * y.float().square().sum() / numel
                loss.backward()
            total += loss.detach()
        self.opt.step()
        self.total = total
        self.dev.sync()

    def check_loss(self) -> None:
        assert self.total is not None
        loss = float(self.total)
        if not math.isfinite(loss):
            raise Invalid(f"the loss is {loss}")

    def gather(self) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Every parameter and its gradient of the global batch, full, on the host of rank 0
        (empty on the others), through the framework's own API: DDP's and ZeRO's replicas
        are full (ZeroRedundancyOptimizer broadcasts the updated shards itself), FSDP1's by
        summon_full_params(with_grads=True), FSDP2's DTensors by full_tensor()."""
        keep = self.d.rank == 0
        out: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

        def host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().to("cpu", copy=True)

        if self.spec.strategy in ("ddp", "zero1"):
            if keep:
                for n, p in self.model.named_parameters():
                    out[param_name(n)] = (host(p), host(p.grad))  # type: ignore[assignment]
        elif self.fsdp1 is not None:
            with self.fsdp1.summon_full_params(self.model, with_grads=True, writeback=False):
                if keep:
                    for n, p in self.model.named_parameters():
                        out[param_name(n)] = (host(p), host(p.grad))  # type: ignore[assignment]
        else:
            for n, p in self.model.named_parameters():
                full = p.full_tensor()
                g = p.grad.full_tensor() if p.grad is not None else None
                if keep:
                    out[param_name(n)] = (host(full), host(g))  # type: ignore[assignment]
        return out


def shard_reference(dev: Device, info: dict[str, Any], spec: ShardSpec, seed: int,
                    got: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]],
                    rng: random.Random) -> dict[str, Any]:
    """The single-process step of the train family's program from the same seed over the
    same global batch, as W·k micro-batches so that its micro-batch is a rank's (the same
    global gradient, and it fits wherever one rank's DDP step fits); its gradients and
    updated weights against the gathered ones."""
    t = spec.train
    ref_info = dict(info, family="train",
                    technique=f"{t.checkpoint}-{t.attention}-mb{t.micro_batches * spec.world}",
                    shape=f"L{t.layers}-h{t.hidden}-heads{t.heads}-n{t.seq}-b{t.batch}")
    ref_info["id"] = f"train/{ref_info['technique']}/{info['dtype']}/{ref_info['shape']}"
    torch.manual_seed(seed)
    prog = TrainProgram(dev, ref_info, rng)
    prog.setup()
    prog.run()
    prog.validate()
    weights, grads = Comparison(), Comparison()
    for name, p in prog.stack.named_parameters():
        if name not in got:
            raise Invalid(f"the sharded model has no parameter {name}")
        w, g = got[name]
        weights.all_finite(name, w)
        weights.add(w, p, lambda i, n=name: f"{n}[{i}]")
        if g is None or p.grad is None:
            raise Invalid(f"{name} has no gradient after the step")
        grads.all_finite(f"d{name}", g)
        grads.add(g, p.grad, lambda i, n=name: f"d{n}[{i}]")
    del prog
    dev.release()
    tol = SHARD_TOLERANCE[info["dtype"]]
    vw, vg = weights.finish(tol), grads.finish(tol)
    worst = max((vw, vg), key=lambda v: v["error"])
    return {"error": worst["error"], "tolerance": tol,
            "compared": vw["compared"] + vg["compared"],
            "detail": f"gradients {vg['error']:.2e} ({vg['detail']}); updated weights "
                      f"{vw['error']:.2e} ({vw['detail']})"}


def shard_record(info: dict[str, Any], status: str, message: Optional[str],
                 spec: Optional[ShardSpec], d: Optional[Dist],
                 implementation: str = "") -> dict[str, Any]:
    rec = record_of(info, status, message)
    if spec is not None:
        rec["shard"] = {
            "strategy": spec.strategy, "world": spec.world, "bucket_bytes": spec.bucket_bytes,
            "rank0_extra": spec.rank0_extra,
            "comm": (f"torch.distributed/{d.backend} {torch.__version__}" if d is not None
                     else ""),
            "implementation": implementation, "ranks": [],
        }
    return rec


def run_shard_case(dev: Device, d: Optional[Dist], info: dict[str, Any], settings: Settings,
                   seed: int, rng: random.Random,
                   start_world: Callable[[], Dist]
                   ) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """One shard case on every rank (all ranks call it with the same case). Returns the record
    (on rank 0; None elsewhere) and a warning for the report, if any."""
    try:
        spec = parse_shard(info)
        if info["dtype"] not in DTYPES:
            raise Skip(f"dtype {info['dtype']} is not one the peer knows")
    except Skip as e:
        return record_of(info, "skipped", str(e)), None
    world = d.world if d is not None else 1
    if spec.world != world:
        return shard_record(info, "skipped", needs_ranks(spec.world), spec, d), None
    if d is None:
        d = start_world()
    group = d.work
    run = ShardRun(dev, d, spec, info["dtype"], seed, group)
    mem: dict[str, Any] = {}
    status, message = "ok", None
    validation: Optional[dict[str, Any]] = None
    samples: list[float] = []
    warning: Optional[str] = None
    t_case = time.perf_counter()
    step_time = 0.0
    peaks: list[Optional[dict[str, Any]]] = [None] * d.world
    try:
        try:
            with dev.measured(mem):
                d.phase(run.build)
                d.phase(run.wrap)
                t0 = time.perf_counter()
                d.phase(run.step)
                step_time = time.perf_counter() - t0
        finally:
            # Every rank's peak, whatever happened (the agreement made every rank leave the
            # region at the same point).
            peaks = d.gather(mem.get("memory"))
        d.phase(run.check_loss)
        got = d.phase(run.gather) or {}

        def judge() -> None:
            """Rank 0 runs the reference and judges; the others wait at the agreement."""
            nonlocal validation, warning
            if d.rank != 0:
                return
            try:
                validation = shard_reference(dev, info, spec, seed, got, rng)
            except Exception as e:  # noqa: BLE001 - only an OOM is let through, said so
                if not is_oom(e):
                    raise
                dev.release()
                warning = (f"{info['id']}: not validated: the single-process reference step "
                           f"did not fit on one device ({one_line(e)})")
            if validation is not None and not passed(validation):
                raise Invalid(f"error {validation['error']:.3e} exceeds the tolerance "
                              f"{validation['tolerance']:.1e} ({validation['detail']})")
        d.phase(judge)
        del got
        # As many warm-up and timed steps as rank 0's budget allows, the same on every rank.
        est = max(step_time, 1e-6)
        budget = settings.max_seconds - (time.perf_counter() - t_case)
        warm = settings.warmup if budget > (settings.warmup + 1) * est else 0
        iters = max(1, min(settings.iters, int((budget - warm * est) / est)))
        warm, iters = d.share((warm, iters))

        def timed() -> None:
            for _ in range(warm):
                run.step()
            for _ in range(iters):
                dist.barrier(group=group)  # the ranks start each timed step together
                dev.sync()
                t = dev.time_once(run.step)
                samples.append(t)
        d.phase(timed)
    except Agreed as e:
        status, message = e.status, e.message
        if status != "skipped":
            d.renew()
    finally:
        impl = run.implementation
        del run
        dev.release()
    if d.rank != 0:
        return None, None
    if impl:
        impl += (f"; each rank's loss is scaled by W = {spec.world}, since the gradients are "
                 "averaged over the ranks")
    rec = shard_record(info, status, message, spec, d, impl)
    rec["validation"] = validation
    if status == "ok":
        rec["time"] = time_stats(samples)
    mine = peaks[0] if peaks else None
    if mine is not None and status != "skipped":
        rec["memory"] = {
            "peak_allocated": int(mine["peak_allocated"]),
            "peak_reserved": int(mine["peak_reserved"]),
            "predicted": int(info.get("predicted_peak_bytes", 0)), "driver": None,
        }
    rec["shard"]["ranks"] = [{"rank": r, "peak_allocated": int(p["peak_allocated"])}
                             for r, p in enumerate(peaks) if p is not None]
    return rec, warning


FAMILIES: dict[str, type[Program]] = {
    "copy": CopyProgram,
    "matmul": MatmulProgram,
    "attention": AttentionProgram,
    "train": TrainProgram,
}


def skip_reason(info: dict[str, Any]) -> Optional[str]:
    family = info["family"]
    if family == "matmul" and info["technique"] != "cublas":
        return SAME_AS_CUBLAS
    if family not in FAMILIES:
        return f"no PyTorch program for the {family} family"
    if info["dtype"] not in DTYPES:
        return f"dtype {info['dtype']} is not one the peer knows"
    return None


# ----------------------------------------------------------------------------------------
# Running one case


@dataclass
class Settings:
    iters: int
    warmup: int
    max_seconds: float
    # Where each training case's memory snapshot goes (CUDA only), or None.
    snapshots: Optional[Path] = None


def record_of(info: dict[str, Any], status: str, message: Optional[str] = None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "id": info["id"], "family": info["family"], "technique": info["technique"],
        "dtype": info["dtype"], "shape": info["shape"], "status": status,
    }
    if message is not None:
        r["message"] = message
    r.update({
        "flops": float(info.get("flops", 0.0)), "bytes_moved": float(info.get("bytes_moved", 0.0)),
        "time": None, "memory": None, "validation": None, "flops_per_s": None,
        "bytes_per_s": None, "fraction_of_ceiling": None, "speed_vs_baseline": None,
    })
    return r


def time_stats(samples: list[float]) -> Optional[dict[str, Any]]:
    """Median, extremes and the 10th/90th percentiles, interpolated as headroom's."""
    v = sorted(x for x in samples if math.isfinite(x))
    if not v:
        return None

    def q(p: float) -> float:
        pos = p * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"median_s": q(0.5), "min_s": v[0], "max_s": v[-1], "p10_s": q(0.1),
            "p90_s": q(0.9), "samples": len(v)}


def snapshot_path(dev: Device, info: dict[str, Any], s: Settings) -> Optional[Path]:
    """Where a training case's memory snapshot goes: on CUDA with --snapshots only."""
    if s.snapshots is None or not dev.cuda or info["family"] != "train":
        return None
    return s.snapshots / (slug(info["id"]) + ".pickle")


@contextlib.contextmanager
def recorded_history(path: Optional[Path]) -> Iterator[None]:
    """PyTorch's allocation history over the body, dumped to `path` (also when the body
    fails: an out-of-memory snapshot is the one worth replaying), as a user records one:
    `_record_memory_history()` then `_dump_snapshot()`. `headroom replay` reads it."""
    if path is None:
        yield
        return
    memory = torch.cuda.memory
    memory._record_memory_history(max_entries=1_000_000)
    try:
        yield
    finally:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            memory._dump_snapshot(str(path))
        except Exception as e:  # noqa: BLE001 - a snapshot that cannot be written is reported
            print(f"headroom_torch: could not write {path}: {one_line(e)}", file=sys.stderr)
        memory._record_memory_history(enabled=None)


def run_case(dev: Device, info: dict[str, Any], settings: Settings,
             rng: random.Random) -> dict[str, Any]:
    reason = skip_reason(info)
    if reason is not None:
        return record_of(info, "skipped", reason)
    prog = FAMILIES[info["family"]](dev, info, rng)
    mem: dict[str, Any] = {}
    t0 = time.perf_counter()
    record: Optional[dict[str, Any]] = None
    validation: Optional[dict[str, Any]] = None
    snapshot = snapshot_path(dev, info, settings)
    try:
        # The memory region: setup and one run, as headroom's (which validates in that run).
        with dev.measured(mem), recorded_history(snapshot):
            prog.setup()
            prog.run()
        first = time.perf_counter() - t0
        validation = prog.validate()
        if validation is not None and not passed(validation):
            record = record_of(info, "invalid",
                               f"error {validation['error']:.3e} exceeds the tolerance "
                               f"{validation['tolerance']:.1e} ({validation['detail']})")
        else:
            samples = time_runs(dev, prog, settings, first)
            record = record_of(info, "ok")
            record["time"] = time_stats(samples)
    except Skip as e:
        record = record_of(info, "skipped", str(e))
    except Invalid as e:
        record = record_of(info, "invalid", str(e))
    except Exception as e:  # noqa: BLE001 - every failure is recorded, and the run goes on
        record = record_of(info, "oom" if is_oom(e) else "error", one_line(e))
    finally:
        del prog
        dev.release()
    assert record is not None
    if snapshot is not None and snapshot.exists():
        record["snapshot"] = snapshot.name
    record["validation"] = validation
    if mem.get("memory") is not None and record["status"] != "skipped":
        m = mem["memory"]
        record["memory"] = {
            "peak_allocated": int(m["peak_allocated"]), "peak_reserved": int(m["peak_reserved"]),
            "predicted": int(info.get("predicted_peak_bytes", 0)), "driver": None,
        }
    return record


def time_runs(dev: Device, prog: Program, s: Settings, first: float) -> list[float]:
    """Warm-up, then up to `iters` timed runs within the case's time budget (at least one)."""
    budget = s.max_seconds - first
    est = max(first, 1e-6)
    for _ in range(s.warmup):
        if budget < 2 * est:
            break
        t0 = time.perf_counter()
        prog.run()
        dev.sync()
        est = time.perf_counter() - t0
        budget -= est
    samples: list[float] = []
    while len(samples) < s.iters and (not samples or budget > est):
        t0 = time.perf_counter()
        samples.append(dev.time_once(prog.run))
        est = time.perf_counter() - t0
        budget -= est
    return samples


# ----------------------------------------------------------------------------------------
# The report


def slug(name: str) -> str:
    """Lowercase, every run of non-alphanumerics one '-', as DeviceFacts::slug."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower())
    return s.strip("-")


def driver_cuda_version() -> Optional[str]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
            return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except OSError:
        pass
    return None


def device_facts(dev: Device, fallback: Optional[str]) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "backend": "torch", "name": "cpu", "compute_capability": None, "sm_count": None,
        "memory_bytes": None, "l2_bytes": None, "sm_clock_mhz": None, "memory_clock_mhz": None,
        "memory_bus_bits": None, "driver_cuda_version": None,
        "nvcc_version": torch.version.cuda, "fallback_reason": fallback,
    }
    if dev.cuda:
        p = torch.cuda.get_device_properties(dev.dev)
        major, minor = torch.cuda.get_device_capability(dev.dev)
        facts.update({
            "name": torch.cuda.get_device_name(dev.dev),
            "compute_capability": f"{major}.{minor}",
            "sm_count": int(p.multi_processor_count),
            "memory_bytes": int(p.total_memory),
            "l2_bytes": int(getattr(p, "L2_cache_size", 0)) or None,
            "driver_cuda_version": driver_cuda_version(),
        })
    return facts


def finalize(report: dict[str, Any]) -> None:
    """Ceilings, rates, fractions of ceiling and the cuBLAS ratio, as Report::finalize."""
    cases = report["cases"]

    def ok(c: dict[str, Any]) -> bool:
        return c["status"] == "ok" and c["time"] is not None

    def best(family: str, technique: str, dtype: str) -> Optional[float]:
        rates = [c["flops"] / c["time"]["median_s"] for c in cases
                 if ok(c) and c["family"] == family and c["technique"] == technique
                 and c["dtype"] == dtype]
        return max(rates) if rates else None

    copies = [c["bytes_moved"] / c["time"]["median_s"] for c in cases
              if ok(c) and c["family"] == "copy"]
    ceil = {
        "copy_bytes_per_s": max(copies) if copies else None,
        "cublas_f32_flops_per_s": best("matmul", "cublas", "f32"),
        "cublas_bf16_flops_per_s": best("matmul", "cublas", "bf16"),
    }
    report["ceilings"] = ceil
    baselines = {f"{c['family']}/{c['dtype']}/{c['shape']}": c["time"]["median_s"]
                 for c in cases if ok(c) and c["technique"] == "cublas"}
    for c in cases:
        for k in ("flops_per_s", "bytes_per_s", "fraction_of_ceiling", "speed_vs_baseline"):
            c[k] = None
        if not ok(c):
            continue
        t = c["time"]["median_s"]
        if t <= 0:
            continue
        c["flops_per_s"] = c["flops"] / t if c["flops"] > 0 else None
        c["bytes_per_s"] = c["bytes_moved"] / t if c["bytes_moved"] > 0 else None
        peak = ceil["cublas_f32_flops_per_s" if c["dtype"] == "f32" else "cublas_bf16_flops_per_s"]
        if c["flops_per_s"] is not None and peak:
            c["fraction_of_ceiling"] = c["flops_per_s"] / peak
        elif c["flops_per_s"] is None and c["bytes_per_s"] is not None and ceil["copy_bytes_per_s"]:
            c["fraction_of_ceiling"] = c["bytes_per_s"] / ceil["copy_bytes_per_s"]
        base = baselines.get(f"{c['family']}/{c['dtype']}/{c['shape']}")
        c["speed_vs_baseline"] = base / t if base else None


def json_safe(x: Any) -> Any:
    """JSON has no infinity: a non-finite validation error is written as the largest double,
    which headroom reads as an f64 (and which fails any tolerance)."""
    if isinstance(x, float) and not math.isfinite(x):
        return sys.float_info.max
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_bytes(text: str) -> int:
    """`24GiB`, `512MiB`, `2k`, `1.5GB`, `4096` -> bytes, as headroom's HEADROOM_BUDGET."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    powers = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20,
              "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    if not m or m.group(2).lower() not in powers:
        raise ValueError(f"'{text}' is not a memory size such as 24GiB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * powers[m.group(2).lower()])


def load_cases(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The CaseInfo list, and the run's facts when the file carries them (a list, or an
    object with `cases` and optionally `profile`, `suite_version`, `commit`)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return data, {}
    if isinstance(data, dict) and isinstance(data.get("cases"), list):
        return data["cases"], {k: v for k, v in data.items() if k != "cases"}
    raise ValueError(f"{path} is not the output of `headroom cases --format json`")


def warm_libraries(dev: Device) -> None:
    """First calls create cuBLAS handles and workspaces (kept by PyTorch for the process);
    doing them here keeps them out of every case's peak, as headroom's figure leaves the
    library's workspace out."""
    for dt in (torch.float32, torch.bfloat16):
        a = torch.ones((64, 64), dtype=dt, device=dev.dev)
        torch.matmul(a, a)
    if dev.cuda and sdpa_kernel is not None:
        q = torch.ones((1, 1, 64, 64), dtype=torch.bfloat16, device=dev.dev, requires_grad=True)
        with contextlib.suppress(RuntimeError):
            flash_attention(q, q, q, True, [SDPBackend.FLASH_ATTENTION]).sum().backward()
    dev.release()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", required=True, type=Path,
                    help="the output of `headroom cases --format json`")
    ap.add_argument("--out", required=True, type=Path,
                    help="folder for <device>-torch.json (<device>-torch-w<W>.json under torchrun)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when PyTorch sees a GPU, else cpu")
    ap.add_argument("--filter", nargs="+", default=[], metavar="SUBSTR",
                    help="only cases whose id contains one of these")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per case (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="time budget of one case; fewer timed runs beyond it (default 60)")
    ap.add_argument("--profile", default=None,
                    help="the profile to record (default: the case file's, "
                         "HEADROOM_PROFILE, quick)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random inputs")
    ap.add_argument("--budget", default=os.environ.get("HEADROOM_BUDGET") or None,
                    help="cap PyTorch's memory (e.g. 24GiB; default HEADROOM_BUDGET), CUDA only")
    ap.add_argument("--snapshots", type=Path, default=None, metavar="DIR",
                    help="on CUDA, record PyTorch's memory history over each training case's "
                         "setup and first step and dump it as DIR/<case>.pickle, for "
                         "`headroom replay`")
    ap.add_argument("--dist-timeout", type=float, default=300.0,
                    help="seconds a shard case's collective may wait for the other ranks "
                         "before it fails (default 300)")
    args = ap.parse_args(argv)

    cases, meta = load_cases(args.cases)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    fallback = None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            fallback = "PyTorch sees no CUDA device"
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("headroom_torch: --device cuda, but PyTorch sees no CUDA device", file=sys.stderr)
        return 2
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # no TF32 (PyTorch >= 2.9)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.device == "cuda":
        # One GPU per rank, by torchrun's LOCAL_RANK (0 outside torchrun).
        torch.cuda.set_device(local_rank)
        # A collective that times out aborts its communicator and raises, rather than
        # killing the process, so the ranks can agree on the failure and go on.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dev = Device(f"cuda:{local_rank}" if args.device == "cuda" else "cpu")
    d: Optional[Dist] = init_dist(dev, args.dist_timeout) if launched else None
    rank = d.rank if d is not None else 0
    world = d.world if d is not None else 1

    def start_world() -> Dist:
        """A world of one in this process, made when the first w1 shard case comes."""
        nonlocal d
        d = init_dist(dev, args.dist_timeout)
        return d

    budget = None
    if args.budget and dev.cuda:
        budget = parse_bytes(args.budget)
        total = torch.cuda.get_device_properties(dev.dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev.dev)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    if d is not None:
        seed = d.share(seed)  # every rank draws the same weights and inputs
    settings = Settings(max(1, args.iters), max(0, args.warmup), args.max_seconds,
                        args.snapshots)
    facts = device_facts(dev, fallback)
    name = f"{'cpu' if not dev.cuda else slug(facts['name'])}-torch"
    out = args.out / (f"{name}-w{world}.json" if launched else f"{name}.json")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "suite_version": str(meta.get("suite_version", "torch-peer")),
        "commit": str(meta.get("commit", "torch-peer")),
        "created_unix": int(time.time()),
        "profile": args.profile or meta.get("profile") or os.environ.get("HEADROOM_PROFILE")
        or "quick",
        "device": facts,
        "budget_bytes": budget,
        "seed": seed,
        "ceilings": {},
        "cases": [],
    }
    warnings: list[str] = []
    selected = [c for c in cases if not args.filter or any(f in c["id"] for f in args.filter)]
    if rank == 0:
        print(f"torch {torch.__version__} on {facts['name']} ({args.device}), {len(selected)} "
              f"cases, seed {seed}" + (f", rank 0 of {world}" if launched else ""), flush=True)
    warm_libraries(dev)

    def write() -> None:
        if rank != 0:
            return
        report["created_unix"] = int(time.time())
        if warnings:
            report["warnings"] = warnings
        finalize(report)
        write_atomic(out, json.dumps(json_safe(report), indent=2) + "\n")

    rc = 0
    for i, info in enumerate(selected):
        torch.manual_seed(seed + i)
        rec: Optional[dict[str, Any]]
        if info.get("family") == "shard":
            try:
                rec, warning = run_shard_case(dev, d, info, settings, seed + i,
                                              random.Random(seed + i), start_world)
            except Fatal as e:
                rec, warning, rc = record_of(info, "error", str(e)), None, 1
            if warning:
                warnings.append(warning)
        elif world > 1:
            rec = record_of(info, "skipped",
                            f"the {info.get('family')} family runs in one process: run it "
                            "without torchrun (or with --nproc_per_node 1)")
        else:
            rec = run_case(dev, info, settings, random.Random(seed + i))
        if rank == 0 and rec is not None:
            report["cases"].append(rec)
            write()
            print(summary(rec), flush=True)
        if rc:
            break  # the ranks cannot agree any more: what was measured is written
    write()
    if rank == 0:
        print(f"report: {out}")
    if d is not None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return rc


def summary(r: dict[str, Any]) -> str:
    parts = [f"{r['status']:<8} {r['id']}"]
    if r["time"]:
        parts.append(f"{r['time']['median_s'] * 1e3:.3f} ms")
    if r["memory"]:
        parts.append(f"peak {r['memory']['peak_allocated'] / 2**20:.1f} MiB allocated, "
                     f"{r['memory']['peak_reserved'] / 2**20:.1f} MiB reserved "
                     f"(headroom's model {r['memory']['predicted'] / 2**20:.1f} MiB)")
    if r["validation"]:
        parts.append(f"error {r['validation']['error']:.2e}")
    if r.get("message"):
        parts.append(r["message"][:200])
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
