"""A sparse model in a hand-written loop: AdamW, OneCycleLR, gradient accumulation, clipping and
bf16 autocast, with RigL at 90% sparsity. Runs in seconds on a CPU on random data.

    python examples/own_loop.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain as st

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
data = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(32)]
accumulate, epochs = 4, 3  # four micro-batches per optimizer step
steps = epochs * len(data) // accumulate

opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
sp = st.sparsify(model, opt, method="rigl", sparsity=0.9, total_steps=steps, update_every=4)

for epoch in range(epochs):
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y) / accumulate
        loss.backward()                    # gradients are masked as they accumulate
        if (i + 1) % accumulate:
            continue
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the applied norm
        opt.step()                         # weights and optimizer state masked; RigL updates
        sched.step()
        opt.zero_grad()
    print(f"epoch {epoch}: loss {loss.item() * accumulate:.3f}, grad norm {norm:.3f}, step {sp.step}")

print(sp.report())
