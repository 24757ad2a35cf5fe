#!/usr/bin/env python3
"""Writes a memory snapshot shaped as PyTorch writes one, without a GPU or PyTorch.

    python3 scripts/fake-snapshot.py OUT.pickle [--steps N] [--layers L] [--devices D]

The history is a training loop on each device: weights allocated once (before recording
began for half of them, so their frees come without allocations), then per step the
activations of L layers in forward order, freed in reverse in backward, with a short-lived
temporary per layer. Entries share their action strings and stack frames as PyTorch's
(the snapshot builds each once and refers to it), and Python's own pickler writes the file
(protocol 4, appends in batches of 1000), so `headroom replay` reads it exactly as it reads
a real one. Used by tests/replay.rs and to measure what a large snapshot costs.
"""

import argparse
import pickle

MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--protocol", type=int, default=4)
    a = ap.parse_args()

    # One object per action and per frame list, as in PyTorch's snapshot.
    actions = {k: "".join(k) for k in ("alloc", "free_requested", "free_completed")}
    frames = [
        [{"filename": "train.py", "line": 100 + i, "name": f"layer{i}_forward"}]
        for i in range(a.layers)
    ]
    weight_frame = [{"filename": "model.py", "line": 7, "name": "__init__"}]

    traces = []
    for dev in range(a.devices):
        entries = []
        free_slots = []
        next_slot = [0]
        t = [0]

        def addr_of():
            if free_slots:
                return free_slots.pop()
            next_slot[0] += 1
            return (dev + 1) << 44 | next_slot[0] << 24

        def entry(action, addr, size, fr):
            t[0] += 1
            return {
                "action": actions[action],
                "addr": addr,
                "size": size,
                "stream": 0,
                "time_us": t[0],
                "frames": fr,
            }

        # Weights: the first half allocated before recording began.
        weights = [(addr_of(), (4 + i % 3) * MIB) for i in range(a.layers)]
        for addr, size in weights[a.layers // 2 :]:
            entries.append(entry("alloc", addr, size, weight_frame))
        for step in range(a.steps):
            saved = []
            for i in range(a.layers):
                size = (1 + (i * 7 + step) % 13) * MIB + 512 * (i % 5)
                addr = addr_of()
                entries.append(entry("alloc", addr, size, frames[i]))
                saved.append((addr, size, i))
                tmp = addr_of()
                entries.append(entry("alloc", tmp, size // 3 + 512, frames[i]))
                entries.append(entry("free_requested", tmp, size // 3 + 512, frames[i]))
                entries.append(entry("free_completed", tmp, size // 3 + 512, frames[i]))
                free_slots.append(tmp)
            for addr, size, i in reversed(saved):
                entries.append(entry("free_requested", addr, size, frames[i]))
                entries.append(entry("free_completed", addr, size, frames[i]))
                free_slots.append(addr)
        for addr, size in weights:
            entries.append(entry("free_requested", addr, size, weight_frame))
            entries.append(entry("free_completed", addr, size, weight_frame))
        traces.append(entries)

    snapshot = {
        "segments": [],
        "device_traces": traces,
        "allocator_settings": {"max_split_size": (1 << 64) - 1, "expandable_segments": False},
    }
    with open(a.out, "wb") as f:
        pickle.dump(snapshot, f, protocol=a.protocol)


if __name__ == "__main__":
    main()
