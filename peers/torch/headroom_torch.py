#!/usr/bin/env python3
"""The PyTorch peer of headroom: the same cases, measured the way PyTorch users measure them.

Reads the case list that `headroom cases --format json` prints, builds for every case it
knows the equivalent PyTorch program (torch.matmul; scaled_dot_product_attention with the
flash backend, and the explicit softmax(QK^T)V; torch.utils.checkpoint; autocast to bf16;
gradient accumulation; AdamW), times it with CUDA events (time.perf_counter on the CPU),
takes its memory from torch.cuda.max_memory_allocated / max_memory_reserved, and writes one
report in headroom's schema (`headroom-report/1`, backend `torch`) that `headroom compare`
puts beside headroom's own.

Needs only PyTorch and the standard library. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
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
    m = re.fullmatch(r"(fwd|fwd\+bwd)/b(\d+)-h(\d+)-n(\d+)-d(\d+)(-causal)?", info["shape"])
    if not m or info["technique"] not in ("naive", "flash"):
        raise Skip(f"attention case '{info['id']}' is not one the peer knows")
    return AttentionSpec(
        variant=info["technique"],
        backward=m.group(1) == "fwd+bwd",
        batch=int(m.group(2)),
        heads=int(m.group(3)),
        seq=int(m.group(4)),
        head_dim=int(m.group(5)),
        causal=m.group(6) is not None,
    )


def parse_train(info: dict[str, Any]) -> TrainSpec:
    t = re.fullmatch(r"(none|full|every\d+|selective)-(naive|flash)-mb(\d+)", info["technique"])
    s = re.fullmatch(r"L(\d+)-h(\d+)-heads(\d+)-n(\d+)-b(\d+)", info["shape"])
    if not t or not s:
        raise Skip(f"training case '{info['id']}' is not one the peer knows")
    spec = TrainSpec(t.group(1), t.group(2), int(t.group(3)), *(int(g) for g in s.groups()))
    if spec.hidden % spec.heads or spec.batch % spec.micro_batches:
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
    """scaled_dot_product_attention restricted to `backends` (the flash one by default)."""
    assert sdpa_kernel is not None
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


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
        self.q = uniform(shape, dt, d, requires_grad=s.backward)
        self.k = uniform(shape, dt, d, requires_grad=s.backward)
        self.v = uniform(shape, dt, d, requires_grad=s.backward)
        self.d_o = uniform(shape, dt, d) if s.backward else None
        self.mask = causal_mask(s.seq, d) if s.variant == "naive" and s.causal else None
        self.o: Optional[torch.Tensor] = None

    def run(self) -> None:
        s = self.spec
        self.o = None
        for t in (self.q, self.k, self.v):
            t.grad = None
        if s.variant == "naive":
            o = naive_attention(self.q, self.k, self.v, s.causal, self.mask)
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
        """Float64 references of sampled heads: every row of O, dQ, dK and dV up to N = 1024;
        beyond, 16 sampled rows of O and dQ and the column sums of dV (sum_j dV_j =
        sum_i dO_i, since every probability row sums to one), as headroom's validation."""
        s = self.spec
        assert self.o is not None
        cmp = Comparison()
        cmp.all_finite("O", self.o)
        if s.backward:
            for name, t in (("dQ", self.q), ("dK", self.k), ("dV", self.v)):
                assert t.grad is not None
                cmp.all_finite(name, t.grad)
        scale = 1.0 / math.sqrt(s.head_dim)
        n = s.seq
        for bh in sample(s.batch * s.heads, 2, self.rng):
            b, h = divmod(bh, s.heads)
            q, k, v = (t.detach()[b, h].double() for t in (self.q, self.k, self.v))
            full = n <= 1024
            rows = list(range(n)) if full else sample(n, 16, self.rng)
            ri = torch.tensor(rows, device=q.device)
            sc = (q[ri] @ k.T) * scale
            if s.causal:
                future = torch.arange(n, device=q.device)[None, :] > ri[:, None]
                sc = sc.masked_fill(future, float("-inf"))
            p = torch.softmax(sc, dim=-1)
            o_ref = p @ v
            d = s.head_dim

            def at(name: str, row_of: list[int]) -> Callable[[int], str]:
                return lambda i: f"{name}[head {bh}][{row_of[i // d]},{i % d}]"

            cmp.add(self.o[b, h][ri], o_ref, at("O", rows))
            if not s.backward:
                continue
            assert self.d_o is not None and self.q.grad is not None
            d_o = self.d_o[b, h].double()
            delta = (d_o[ri] * o_ref).sum(-1, keepdim=True)
            ds = p * (d_o[ri] @ v.T - delta)
            cmp.add(self.q.grad[b, h][ri], scale * ds @ k, at("dQ", rows))
            assert self.k.grad is not None and self.v.grad is not None
            if full:
                cmp.add(self.k.grad[b, h], scale * ds.T @ q, at("dK", rows))
                cmp.add(self.v.grad[b, h], p.T @ d_o, at("dV", rows))
            else:
                cmp.add(self.v.grad[b, h].double().sum(0), d_o.sum(0),
                        lambda c: f"sum_j dV[head {bh}][{c}]")
        return cmp.finish(self.info["tolerance"])


class Block(nn.Module):
    """One pre-norm GPT block as headroom's model: separate q/k/v projections, causal
    attention, GELU (tanh) MLP of 4x; `selective` checkpoints only the attention core."""

    def __init__(self, spec: TrainSpec, dev: torch.device, attention: Callable[..., torch.Tensor],
                 selective: bool) -> None:
        super().__init__()
        c = spec.hidden
        self.heads = spec.heads
        self.attention = attention
        self.selective = selective
        self.ln1 = nn.LayerNorm(c, eps=1e-5, device=dev)
        self.q = nn.Linear(c, c, device=dev)
        self.k = nn.Linear(c, c, device=dev)
        self.v = nn.Linear(c, c, device=dev)
        self.proj = nn.Linear(c, c, device=dev)
        self.ln2 = nn.LayerNorm(c, eps=1e-5, device=dev)
        self.fc = nn.Linear(c, 4 * c, device=dev)
        self.fc2 = nn.Linear(4 * c, c, device=dev)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = q.shape
        return self.attention(q, k, v).transpose(1, 2).reshape(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.ln1(x)
        q, k, v = (lin(h).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        if self.selective:
            a = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            a = self.core(q, k, v)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class TrainProgram(Program):
    """One optimizer step of headroom's block stack: zero_grad(set_to_none=True), forward and
    backward over the micro-batches (gradients accumulated), AdamW (fused where offered)."""

    def setup(self) -> None:
        s = self.spec = parse_train(self.info)
        d = self.dev.dev
        self.dtype = DTYPES[self.info["dtype"]]
        mask = causal_mask(s.seq, d) if s.attention == "naive" else None
        if s.attention == "naive":
            def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return naive_attention(q, k, v, True, mask)
        else:
            if sdpa_kernel is None:
                raise Skip(f"this PyTorch ({torch.__version__}) has no sdpa_kernel")
            # fp32 on CUDA has no flash kernel: the memory-efficient one (also linear in N,
            # also keeps only the logsumexp) stands in, as SDPA itself would choose.
            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

            def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return flash_attention(q, k, v, True, backends)
        self.blocks = nn.ModuleList(
            Block(s, d, attention, s.checkpoint == "selective") for _ in range(s.layers))
        with torch.no_grad():
            for name, p in self.blocks.named_parameters():
                if name.endswith(("ln1.weight", "ln2.weight")):
                    p.uniform_(0.9, 1.1)
                elif p.dim() == 2:
                    p.uniform_(-0.0346, 0.0346)  # std 0.02, as headroom's init
                else:
                    p.uniform_(-0.02, 0.02)
        self.x = uniform((s.batch, s.seq, s.hidden), torch.float32, d)
        params = list(self.blocks.parameters())
        kw: dict[str, Any] = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        # The moments exist from the start, as headroom allocates them in its setup: one
        # step on zero gradients creates them (it moves the weights only by weight decay).
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            self.opt = torch.optim.AdamW(params, fused=True, **kw)
            self.opt.step()
        except (RuntimeError, TypeError, ValueError) as e:
            if is_oom(e):
                raise
            # This PyTorch has no fused AdamW for the device: the default (foreach) one.
            self.opt = torch.optim.AdamW(params, **kw)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.total: Optional[torch.Tensor] = None

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

    def run(self) -> None:
        s = self.spec
        self.opt.zero_grad(set_to_none=True)
        numel = s.batch * s.seq * s.hidden
        total = torch.zeros((), device=self.dev.dev)
        autocast = (torch.autocast(self.dev.dev.type, dtype=torch.bfloat16)
                    if self.dtype == torch.bfloat16 else contextlib.nullcontext())
        for x in self.x.chunk(s.micro_batches, dim=0):
            with autocast:
                y = self.forward(x)
            # L = ½·Σy²/numel over the global batch, so micro-batches add up to it.
            loss = 0.5 * y.float().square().sum() / numel
            loss.backward()
            total += loss.detach()
        self.opt.step()
        self.total = total

    def validate(self) -> None:
        """No reference step here (headroom's own check compares the gradients): a loss that
        is not finite is all this catches."""
        assert self.total is not None
        loss = float(self.total)
        if not math.isfinite(loss):
            raise Invalid(f"the loss is {loss}")


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
    try:
        # The memory region: setup and one run, as headroom's (which validates in that run).
        with dev.measured(mem):
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
    ap.add_argument("--out", required=True, type=Path, help="folder for <device>-torch.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when PyTorch sees a GPU, else cpu")
    ap.add_argument("--filter", nargs="+", default=[], metavar="SUBSTR",
                    help="only cases whose id contains one of these")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per case (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="time budget of one case; fewer timed runs beyond it (default 60)")
    ap.add_argument("--profile", default=None,
                    help="the profile to record (default: the case file's, HEADROOM_PROFILE, quick)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random inputs")
    ap.add_argument("--budget", default=os.environ.get("HEADROOM_BUDGET") or None,
                    help="cap PyTorch's memory (e.g. 24GiB; default HEADROOM_BUDGET), CUDA only")
    args = ap.parse_args(argv)

    cases, meta = load_cases(args.cases)
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
    dev = Device(args.device)
    budget = None
    if args.budget and dev.cuda:
        budget = parse_bytes(args.budget)
        total = torch.cuda.get_device_properties(dev.dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev.dev)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    settings = Settings(max(1, args.iters), max(0, args.warmup), args.max_seconds)
    facts = device_facts(dev, fallback)
    out = args.out / f"{'cpu' if not dev.cuda else slug(facts['name'])}-torch.json"
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
    selected = [c for c in cases if not args.filter or any(f in c["id"] for f in args.filter)]
    print(f"torch {torch.__version__} on {facts['name']} ({args.device}), {len(selected)} "
          f"cases, seed {seed}", flush=True)
    warm_libraries(dev)
    for i, info in enumerate(selected):
        torch.manual_seed(seed + i)
        rec = run_case(dev, info, settings, random.Random(seed + i))
        report["cases"].append(rec)
        report["created_unix"] = int(time.time())
        finalize(report)
        write_atomic(out, json.dumps(json_safe(report), indent=2) + "\n")
        print(summary(rec), flush=True)
    finalize(report)
    write_atomic(out, json.dumps(json_safe(report), indent=2) + "\n")
    print(f"report: {out}")
    return 0


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
