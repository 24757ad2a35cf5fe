"""Unit tests of the PyTorch peer's helpers and one tiny CPU run.

    python3 -m unittest peers/torch/test_headroom_torch.py

Skipped as a whole where PyTorch cannot be imported (the peer itself needs it)."""

from __future__ import annotations

import importlib.util
import json
import math
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
class TinyRun(unittest.TestCase):
    def test_cpu_report(self) -> None:
        cases = [info("matmul/cublas/f32/m64-n48-k32", flops=2.0 * 64 * 48 * 32),
                 info("matmul/simt/f32/m64-n48-k32"),
                 info("attention/naive/f32/fwd+bwd/b1-h2-n16-d64-causal"),
                 info("train/every2-naive-mb2/f32/L3-h128-heads2-n8-b2"),
                 info("train/selective-flash-mb1/f32/L2-h128-heads2-n8-b2")]
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
        for c in report["cases"]:
            if c["family"] != "matmul" or c["technique"] == "cublas":
                self.assertEqual(c["status"], "ok", c)
                self.assertIsNone(c["memory"])
                self.assertGreaterEqual(c["time"]["samples"], 1)
        naive = report["cases"][2]["validation"]
        self.assertLessEqual(naive["error"], naive["tolerance"])


if __name__ == "__main__":
    unittest.main()
