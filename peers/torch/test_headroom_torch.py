"""Unit tests of the PyTorch peer's helpers and one tiny CPU run.

    python3 -m unittest peers/torch/test_headroom_torch.py

Skipped as a whole where PyTorch cannot be imported (the peer itself needs it)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HAVE_TORCH = importlib.util.find_spec("torch") is not None
if HAVE_TORCH:
    sys.path.insert(0, str(HERE))
    import headroom_torch as ht  # noqa: E402


def info(id_: str, flops: float = 0.0, bytes_moved: float = 0.0,
         tolerance: float = 1e-4) -> dict[str, Any]:
    family, technique, dtype, shape = id_.split("/", 3)
    return {"id": id_, "family": family, "technique": technique, "dtype": dtype,
            "shape": shape, "flops": flops, "bytes_moved": bytes_moved,
            "predicted_peak_bytes": 0, "tolerance": tolerance}


@unittest.skipUnless(HAVE_TORCH, "PyTorch is not installed")
class Helpers(unittest.TestCase):
    def test_slug_matches_device_facts(self) -> None:
        self.assertEqual(ht.slug("NVIDIA H100 80GB HBM3"), "nvidia-h100-80gb-hbm3")
        self.assertEqual(ht.slug("  NVIDIA  GeForce RTX 4090!"), "nvidia-geforce-rtx-4090")

    def test_parse_bytes_as_headroom(self) -> None:
        self.assertEqual(ht.parse_bytes("24GiB"), 24 << 30)
        self.assertEqual(ht.parse_bytes("512 mib"), 512 << 20)
        self.assertEqual(ht.parse_bytes("1.5GB"), 1_500_000_000)
        self.assertEqual(ht.parse_bytes("2k"), 2048)
        self.assertEqual(ht.parse_bytes("4096"), 4096)
        with self.assertRaises(ValueError):
            ht.parse_bytes("lots")

    def test_time_stats_interpolate(self) -> None:
        t = ht.time_stats([3.0, 1.0, 2.0, float("nan")])
        assert t is not None
        self.assertEqual((t["median_s"], t["min_s"], t["max_s"], t["samples"]), (2.0, 1.0, 3.0, 3))
        self.assertAlmostEqual(t["p10_s"], 1.2)
        self.assertIsNone(ht.time_stats([]))

    def test_ids_parse(self) -> None:
        a = ht.parse_attention(info("attention/flash/bf16/fwd+bwd/b2-h16-n8192-d128-causal"))
        self.assertEqual((a.variant, a.backward, a.batch, a.heads, a.seq, a.head_dim, a.causal),
                         ("flash", True, 2, 16, 8192, 128, True))
        t = ht.parse_train(info("train/every3-flash-mb4/bf16/L12-h768-heads12-n1024-b8"))
        self.assertEqual((t.every, t.micro_batches, t.layers, t.hidden), (3, 4, 12, 768))
        self.assertEqual(ht.parse_train(info("train/full-naive-mb1/f32/L4-h128-heads2-n32-b4"))
                         .every, 1)
        self.assertEqual(ht.parse_train(info("train/selective-naive-mb1/f32/L4-h128-heads2-n32-b4"))
                         .every, 0)
        with self.assertRaises(ht.Skip):
            ht.parse_matmul(info("matmul/cublas/f32/m127-n257-k131-nt"))

    def test_model_ids_parse(self) -> None:
        """The architecture suffix and head-loss variant of headroom's training ids."""
        shape = "L2-h128-heads2-n32-b4-kv1-ffn352-swiglu-rms-nobias-v4099"
        t = ht.parse_train(info(f"train/full-flash-mb1/bf16/{shape}"))
        self.assertEqual((t.layers, t.hidden, t.heads, t.kv, t.ffn_size, t.mlp, t.norm, t.bias,
                          t.vocab, t.tied, t.positions, t.head_loss),
                         (2, 128, 2, 1, 352, "swiglu", "rms", "none", 4099, False, 0,
                          "materialized"))
        self.assertEqual(ht.parse_train(info(f"train/full-flash-mb1-chunked32/bf16/{shape}"))
                         .head_loss, "chunked32")
        self.assertEqual(ht.parse_train(info(f"train/none-flash-mb1-chunked/bf16/{shape}"))
                         .head_loss, f"chunked{ht.DEFAULT_CHUNK_ROWS}")
        gpt2 = ht.parse_train(info("train/none-flash-mb1/bf16/L2-h128-heads2-n32-b4-qkvbias"
                                   "-v515-tied-pos64"))
        self.assertEqual((gpt2.bias, gpt2.vocab, gpt2.tied, gpt2.positions, gpt2.kv, gpt2.ffn_size,
                          gpt2.mlp, gpt2.norm), ("qkv", 515, True, 64, 2, 512, "gelu",
                                                 "layernorm"))
        with self.assertRaises(ht.Skip) as cm:
            ht.parse_train(info(f"train/full-flash-mb1-fused/bf16/{shape}"))
        self.assertEqual(str(cm.exception), ht.FUSED_CE)
        for bad in ("L2-h128-heads2-n32-b4-moe8", "L2-h128-heads2-n32-b4-kv3",
                    "L2-h128-heads2-n32-b4-tied", "L2-h128-heads2-n128-b4-v64-pos64"):
            with self.assertRaises(ht.Skip, msg=bad):
                ht.parse_train(info(f"train/none-flash-mb1/bf16/{bad}"))
        with self.assertRaises(ht.Skip):
            ht.parse_train(info("train/none-flash-mb1-chunked32/bf16/L2-h128-heads2-n32-b4"))

    def test_shard_ids_parse(self) -> None:
        base = "L2-h128-heads2-n64-b8"
        for strategy in ht.STRATEGIES:
            s = ht.parse_shard(info(f"shard/{strategy}-selective-flash-mb1/bf16/{base}-w4"))
            self.assertEqual((s.strategy, s.world, s.bucket_bytes, s.rank0_extra, s.local_batch),
                             (strategy, 4, 25 << 20, 0, 2))
            t = s.train
            self.assertEqual((t.checkpoint, t.attention, t.micro_batches, t.layers, t.hidden,
                              t.heads, t.seq, t.batch),
                             ("selective", "flash", 1, 2, 128, 2, 64, 8))
        s = ht.parse_shard(info(f"shard/fsdp-noreshard-every2-naive-mb2/f32/{base}-w2-bk4096"))
        self.assertEqual((s.strategy, s.train.every, s.train.micro_batches, s.bucket_bytes,
                          s.rank0_extra), ("fsdp-noreshard", 2, 2, 4096, 0))
        s = ht.parse_shard(info(f"shard/ddp-full-naive-mb4/f32/{base}-w2-x1000000"))
        self.assertEqual((s.bucket_bytes, s.rank0_extra, s.train.every), (25 << 20, 1000000, 1))
        s = ht.parse_shard(info(f"shard/zero1-none-flash-mb1/f32/{base}-w8-bk1048576-x7"))
        self.assertEqual((s.world, s.local_batch, s.bucket_bytes, s.rank0_extra),
                         (8, 1, 1 << 20, 7))

    def test_malformed_shard_ids_are_refused_with_the_reason(self) -> None:
        base = "L2-h128-heads2-n64-b8"
        for id_, why in (
            (f"shard/zero3-none-naive-mb1/f32/{base}-w2", "'zero3' is not a strategy"),
            (f"shard/fsdp-reshard-none-naive-mb1/f32/{base}-w2", "'fsdp-reshard' is not"),
            (f"shard/none-naive-mb1/f32/{base}-w2", "is not <strategy>-<checkpoint>"),
            (f"shard/ddp-some-naive-mb1/f32/{base}-w2", "'some-naive-mb1' is not"),
            (f"shard/ddp-none-naive-mb0/f32/{base}-w2", "'none-naive-mb0' is not"),
            (f"shard/ddp-none-naive-mb1/f32/{base}", "shape 'L2-h128-heads2-n64-b8' is not"),
            (f"shard/ddp-none-naive-mb1/f32/{base}-w2-x5-bk9", "is not L<layers>"),
            (f"shard/ddp-none-naive-mb1/f32/{base}-w3", "does not split evenly over 3 ranks"),
            (f"shard/ddp-none-naive-mb4/f32/{base}-w4", "do not split into 4 micro-batches"),
            (f"shard/ddp-none-naive-mb1/f32/{base}-w0", "a world of 0 ranks"),
            (f"shard/ddp-none-naive-mb1/f32/{base}-w2-bk0", "a bucket of 0 bytes"),
            ("shard/ddp-none-naive-mb1/f32/L2-h100-heads3-n64-b8-w2",
             "does not split into 3 heads"),
        ):
            with self.subTest(id_), self.assertRaises(ht.Skip) as cm:
                ht.parse_shard(info(id_))
            self.assertIn(why, str(cm.exception))
            self.assertIn(id_, str(cm.exception))
            self.assertIn("the form is shard/<strategy>", str(cm.exception))

    def test_shard_skips_name_the_ranks_needed(self) -> None:
        self.assertEqual(ht.needs_ranks(4), "needs 4 ranks; run under torchrun --nproc_per_node 4")
        self.assertIn("without torchrun", ht.needs_ranks(1))

    def test_ranks_agree_on_the_root_cause(self) -> None:
        class Told(ht.Dist):
            """A world whose ranks report `said` (no process group needed)."""

            def __init__(self, said: list[Any]) -> None:
                super().__init__(rank=0, world=len(said), launched=True, backend="gloo",
                                 timeout=1.0)
                self.said = said

            def gather(self, item: Any) -> list[Any]:
                return self.said

        Told([None, None]).agree(None)  # nobody failed: no exception
        waited = ("error", "[gloo] Timed out waiting 15000ms for send operation to complete")
        for said, want in (
            ([waited, ("error", "injected")], ("error", "rank 1: injected")),
            ([waited, ("oom", "CUDA out of memory")], ("oom", "rank 1: CUDA out of memory")),
            ([("error", "a"), ("error", "b")], ("error", "rank 0: a")),
            ([None, ("skipped", "no FSDP2")], ("skipped", "rank 1: no FSDP2")),
        ):
            with self.subTest(said), self.assertRaises(ht.Agreed) as cm:
                Told(said).agree(said[0])
            self.assertEqual((cm.exception.status, cm.exception.message), want)

    def test_skips(self) -> None:
        self.assertEqual(ht.skip_reason(info("matmul/wgmma/bf16/m1-n1-k1")), ht.SAME_AS_CUBLAS)
        self.assertIsNone(ht.skip_reason(info("matmul/cublas/bf16/m1-n1-k1")))
        self.assertIn("alloc", ht.skip_reason(info("alloc/pool/sim/steady-shapes")) or "")

    def test_finalize_as_report_finalize(self) -> None:
        cases = []
        for id_, t in (("matmul/cublas/f32/m2-n2-k2", 2.0), ("copy/vec16/f32/n4", 1.0),
                       ("attention/flash/f32/fwd/b1-h1-n2-d64", 4.0)):
            r = ht.record_of(info(id_, flops=0.0 if "copy" in id_ else 8.0, bytes_moved=16.0), "ok")
            r["time"] = ht.time_stats([t])
            cases.append(r)
        cases.append(ht.record_of(info("matmul/simt/f32/m2-n2-k2"), "skipped", "x"))
        report = {"cases": cases}
        ht.finalize(report)
        self.assertEqual(report["ceilings"], {"copy_bytes_per_s": 16.0,
                                              "cublas_f32_flops_per_s": 4.0,
                                              "cublas_bf16_flops_per_s": None})
        self.assertEqual(cases[0]["speed_vs_baseline"], 1.0)
        self.assertEqual(cases[2]["fraction_of_ceiling"], 0.5)
        self.assertEqual(cases[1]["fraction_of_ceiling"], 1.0)
        self.assertIsNone(cases[3]["flops_per_s"])

    def test_json_has_no_infinity(self) -> None:
        text = json.dumps(ht.json_safe({"error": math.inf, "x": [math.nan]}))
        self.assertNotIn("Infinity", text)
        self.assertNotIn("NaN", text)


@unittest.skipUnless(HAVE_TORCH, "PyTorch is not installed")
@unittest.skipUnless(HAVE_TORCH, "PyTorch is not installed")
class GroupedQuery(unittest.TestCase):
    """Fewer K/V heads than query heads: SDPA's enable_gqa for flash, repeated K/V for the
    naive program, and a validation that sums dK and dV over each group."""

    def test_ids_parse(self) -> None:
        a = ht.parse_attention(info("attention/flash/bf16/fwd+bwd/b1-h4-n128-d64-kv2"))
        self.assertEqual((a.heads, a.kv_heads, a.causal), (4, 2, False))
        a = ht.parse_attention(info("attention/naive/f32/fwd/b1-h4-n16-d64-causal-kv1"))
        self.assertEqual((a.heads, a.kv_heads, a.causal), (4, 1, True))
        self.assertEqual(ht.parse_attention(info("attention/naive/f32/fwd/b1-h4-n16-d64"))
                         .kv_heads, 4)
        with self.assertRaises(ht.Skip):
            ht.parse_attention(info("attention/naive/f32/fwd/b1-h4-n16-d64-kv3"))

    def program(self, variant: str, causal: bool) -> Any:
        shape = f"fwd+bwd/b1-h4-n24-d64{'-causal' if causal else ''}-kv2"
        p = ht.AttentionProgram(ht.Device("cpu"), info(f"attention/{variant}/f32/{shape}"),
                                ht.random.Random(5))
        p.setup()
        p.run()
        return p

    def test_both_programs_pass_and_a_wrong_gradient_fails(self) -> None:
        for variant in ("naive", "flash"):
            for causal in (False, True):
                p = self.program(variant, causal)
                self.assertEqual(tuple(p.k.grad.shape), (1, 2, 24, 64))
                v = p.validate()
                self.assertTrue(ht.passed(v), (variant, causal, v))
                # dK of one query head instead of the group's sum; one dV element off by 5%;
                # one dQ row swapped with another.
                good = p.k.grad.clone()
                p.k.grad[0, 1] *= 0.5
                self.assertFalse(ht.passed(p.validate()), (variant, "dK"))
                p.k.grad.copy_(good)
                p.v.grad[0, 0, 3, 7] *= 1.05
                self.assertFalse(ht.passed(p.validate()), (variant, "dV"))
                p.v.grad[0, 0, 3, 7] /= 1.05
                self.assertTrue(ht.passed(p.validate()))
                p.q.grad[0, 3, [2, 9]] = p.q.grad[0, 3, [9, 2]]
                self.assertFalse(ht.passed(p.validate()), (variant, "dQ"))


@unittest.skipUnless(HAVE_TORCH, "PyTorch is not installed")
class ModelLoss(unittest.TestCase):
    def test_loss_check_catches_a_wrong_mean(self) -> None:
        """A model's step passes its loss check, and fails it with the loss a sum (not the
        mean) or a tenth of the mean would give."""
        dev = ht.Device("cpu")
        for head in ("", "-chunked7"):
            i = info(f"train/none-naive-mb2{head}/f32/L1-h64-heads2-n8-b2-kv1-rms-v97")
            p = ht.TrainProgram(dev, i, random.Random(1))
            p.setup()
            p.run()
            p.validate()
            assert p.total is not None
            self.assertAlmostEqual(float(p.total), math.log(97), delta=0.3)
            right = p.total.clone()
            for wrong in (right * p.counted, right / 10):
                p.total = wrong
                with self.assertRaises(ht.Invalid):
                    p.validate()

    def test_chunks_give_the_materialized_loss(self) -> None:
        torch = ht.torch
        g = torch.Generator().manual_seed(5)
        h = torch.randn(23, 16, generator=g)
        w = torch.randn(41, 16, generator=g)
        t = torch.randint(0, 41, (23,), generator=g)
        t[[0, 7, 22]] = ht.IGNORE_INDEX
        full = ht.lm_loss(h, w, t, "materialized")
        for rows in (1, 5, 23, 64):
            self.assertAlmostEqual(float(ht.lm_loss(h, w, t, f"chunked{rows}")), float(full),
                                   places=4)


class TinyRun(unittest.TestCase):
    def test_cpu_report(self) -> None:
        cases = [info("matmul/cublas/f32/m64-n48-k32", flops=2.0 * 64 * 48 * 32),
                 info("matmul/simt/f32/m64-n48-k32"),
                 info("attention/naive/f32/fwd+bwd/b1-h2-n16-d64-causal"),
                 info("train/every2-naive-mb2/f32/L3-h128-heads2-n8-b2"),
                 info("train/selective-flash-mb1/f32/L2-h128-heads2-n8-b2"),
                 # A model with a vocabulary, each head-loss variant the peer has, and one it
                 # has not (skipped, with the reason).
                 info("train/full-naive-mb2/f32/L2-h128-heads2-n8-b2-kv1-ffn96-swiglu-rms-nobias"
                      "-v67"),
                 info("train/none-flash-mb1-chunked5/f32/L1-h128-heads2-n8-b2-qkvbias-v67-tied"
                      "-pos8"),
                 info("train/none-flash-mb1-fused/f32/L1-h128-heads2-n8-b2-v67"),
                 info("shard/fsdp-full-naive-mb2/f32/L2-h128-heads2-n8-b2-w1-x4096"),
                 info("shard/ddp-none-naive-mb1/f32/L2-h128-heads2-n8-b4-w2")]
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "cases.json"
            path.write_text(json.dumps(cases))
            rc = ht.main(["--cases", str(path), "--out", d, "--device", "cpu", "--iters", "2",
                          "--warmup", "0", "--seed", "3"])
            self.assertEqual(rc, 0)
            report = json.loads((Path(d) / "cpu-torch.json").read_text())
        self.assertEqual(report["schema"], "headroom-report/1")
        self.assertEqual(report["device"]["backend"], "torch")
        status = {c["id"]: c["status"] for c in report["cases"]}
        self.assertEqual(list(status), [c["id"] for c in cases])
        self.assertEqual(status["matmul/simt/f32/m64-n48-k32"], "skipped")
        fused = next(c for c in report["cases"] if c["technique"].endswith("-fused"))
        self.assertEqual((fused["status"], fused["message"]), ("skipped", ht.FUSED_CE))
        # A world of one runs in this process; a case for two ranks says how to run it.
        self.assertEqual(report["cases"][-1]["status"], "skipped")
        self.assertEqual(report["cases"][-1]["message"],
                         "needs 2 ranks; run under torchrun --nproc_per_node 2")
        shard = report["cases"][-2]["shard"]
        self.assertEqual((shard["strategy"], shard["world"], shard["rank0_extra"],
                          shard["ranks"]), ("fsdp", 1, 4096, []))
        self.assertTrue(shard["comm"].startswith("torch.distributed/gloo "), shard)
        shard_v = report["cases"][-2]["validation"]
        self.assertLessEqual(shard_v["error"], shard_v["tolerance"])
        self.assertGreater(shard_v["compared"], 0)
        for c in report["cases"][:-1]:
            if c is not fused and (c["family"] != "matmul" or c["technique"] == "cublas"):
                self.assertEqual(c["status"], "ok", c)
                self.assertIsNone(c["memory"])
                self.assertGreaterEqual(c["time"]["samples"], 1)
        naive = report["cases"][2]["validation"]
        self.assertLessEqual(naive["error"], naive["tolerance"])


if __name__ == "__main__":
    unittest.main()
