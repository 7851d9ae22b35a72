"""The memory guard of SAM fine-tuning: a real training step whose peak resident memory must stay bounded.

Measured in a fresh child process (VmHWM, the kernel's own peak of resident memory), so a fast machine cannot
hide a regression: the bound is on bytes, not seconds. The step is the study's setting at the decoder's real
size: HQ-SAM ``vit_tiny`` (random weights), ``--trainable decoder``, embeddings as the embedding cache gives them
(no encoder run), four phantom slices with every organ's box prompt (23 prompts at 256 x 256), forward, backward
and an AdamW step. Before the training decoder ran in bounded chunks
(:func:`flaresam.models.sam.decoding.decode_in_chunks`) it kept every prompt's activations, about 150 MB each,
for the backward pass: this step peaked at 6.7 GB (VmHWM); it now stays under the 3 GB bound.
docs/training.md#memory-and-time-on-a-cpu has the
figures of whole runs (``benchmarks/train_bench.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import phantom_store

REPO = Path(__file__).resolve().parents[1]
BOUND_MIB = 3000

STEP = """
import json, sys
import torch
from flaresam.cpu_memory import keep_freed_memory
keep_freed_memory()  # as the flaresam command runs: freed memory stays resident, so VmHWM counts every peak
from flaresam.data.store import PreparedStore
from flaresam.models.sam.options import SamOptions
from flaresam.models.sam.step import load_sam_step

store = PreparedStore(sys.argv[1])
step = load_sam_step("hqsam", SamOptions(arch="vit_tiny", init="random", trainable="decoder"), quiet=True)
spec = step.spec
dataset = step.train_dataset(store, store.train_ids, seed=0)
items = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 4))][:4]
gen = torch.Generator().manual_seed(0)
for it in items:  # as a cache hit gives them: no image, the embedding and HQ-SAM's early feature in float16
    it["image"] = None
    it["embedding"] = torch.randn(spec.prompt_dim, spec.embedding_size, spec.embedding_size, generator=gen).half()
    it["interm"] = torch.randn(spec.embedding_size, spec.embedding_size, spec.vit_dim, generator=gen).half()
batch = step.collate(items)
optimizer = torch.optim.AdamW(step.trainable_module().parameters(), lr=1e-4)
step.network().train()
loss, n = step.loss(batch, "cpu")
loss.backward()
optimizer.step()
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"prompts": n, "loss": float(loss), "peak_mib": hwm / 1024}))
"""


def test_decoder_training_step_peak_memory_is_bounded(tmp_path):
    store = phantom_store(tmp_path, cases=2, size=96, slices=8, seed=0, val_fraction=0.5)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", STEP, str(store.root)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["prompts"] >= 20  # the step is as large as meant: the bound below means something
    assert result["peak_mib"] < BOUND_MIB, result
