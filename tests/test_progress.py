"""Progress bars: shown on a terminal only, and given to the long steps (export timing, the dense
twin's fine-tuning)."""

import torch
from torch import nn

from sparsetrain import progress as progress_module
from sparsetrain.export import sparse_cpu
from sparsetrain.train import epochs


def test_bars_are_off_in_ci_and_when_hidden(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert progress_module.progress(range(3), "x").disable
    monkeypatch.delenv("CI")
    assert progress_module.progress(range(3), "x", hidden=True).disable
    assert list(progress_module.progress(range(3), "x")) == [0, 1, 2]


def test_export_timing_and_extra_phases_have_named_bars(monkeypatch):
    names = []

    def spy(iterable, desc, **options):
        names.append(desc)
        return progress_module.progress(iterable, desc, **options)

    monkeypatch.setattr(sparse_cpu, "progress", spy)
    monkeypatch.setattr(epochs, "progress_bar", spy)
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[:, :12] = 0
    sparse_cpu.to_sparse_cpu(model, batch_size=4, rounds=1)
    assert names == ["timing layers"]

    import sparsetrain as st

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = st.sparsify(net, opt, method="dense", sparsity=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    state = epochs.TrainState(net, opt, sched, sp)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    epochs.train_epoch(state, batches, phase="dense_twin")
    assert names[-1] == "dense twin epoch 1"
