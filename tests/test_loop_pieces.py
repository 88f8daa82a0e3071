"""The small pieces the training loop is made of: the seeding scheme, the precision rules, the progress line,
the checkpointer's best-score rule."""
import itertools

import pytest
import torch

from common.checkpoint import Checkpointer, load_checkpoint
from common.engine import Precision, StepParts, UnitScaler, grad_scaler, precision_from_flags, uses_loss_scaling
from common.log import format_duration
from common.data import BatchLayout
from common.data import derive_seed, sample_seed, seed_micro_batch
from common.device_loader import batch_generator


def test_the_seeding_scheme_is_pinned():
    # Exact resume across versions of this code depends on these numbers: change them only on purpose.
    assert derive_seed("epoch", 0, 0, 0) == 3941715099434534770
    # Per micro-batch, by (epoch, step, slot): slot 1 is rank 1's micro-batch with --accum-steps 1 (the number the
    # scheme keyed by rank gave it), and the second micro-batch of one process with --accum-steps 2.
    seed_micro_batch(0, 3, 17, 1)
    assert torch.initial_seed() == derive_seed("step", 0, 3, 17, 1) == 1213057993237308119
    assert sample_seed(42, 2, 12345) == derive_seed("sample", 42, 2, 12345) == 207354662272974991
    # --data-backend gpu: seed 7, epoch 1, step 0, slot 5.
    assert torch.equal(batch_generator(7, 1, 0, 5).get_state(),
                       torch.Generator().manual_seed(6577820859125905359).get_state())


def test_a_micro_batch_draws_the_same_under_every_layout_of_its_global_batch():
    def draws(layout):
        """Per (step, slot): what a micro-batch draws from the global stream, as dropout or MixUp would."""
        seen = {}
        for rank in range(layout.world_size):
            ranked = BatchLayout(layout.world_size, rank, layout.batch_size, layout.accum_steps)
            for step in range(2):
                for micro in range(layout.accum_steps):
                    seed_micro_batch(0, 1, step, ranked.slot(micro))
                    seen[step, ranked.slot(micro)] = torch.rand(3)
        return seen

    two_processes, one_with_accumulation = draws(BatchLayout(2, 0, 8, 1)), draws(BatchLayout(1, 0, 8, 2))
    assert two_processes.keys() == one_with_accumulation.keys() and len(two_processes) == 4
    assert all(torch.equal(two_processes[k], one_with_accumulation[k]) for k in two_processes)
    assert not torch.equal(two_processes[0, 0], two_processes[0, 1])


def test_every_stream_and_position_gets_its_own_seed():
    seeds = [derive_seed(stream, seed, *position) for stream in ("epoch", "step", "sample", "batch")
             for seed in range(3) for position in itertools.product(range(4), range(4), range(3))]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    # Large positions do not spill into their neighbours (an ImageNet epoch holds 1.28 million indices).
    assert sample_seed(0, 1, 5) != sample_seed(0, 0, 1_000_008) and sample_seed(0, 0, 2**40) != sample_seed(0, 1, 0)


@pytest.mark.parametrize("amp,amp_dtype,expected", [(False, None, "float32"), (True, None, "float16"),
                                                    (False, "bfloat16", "bfloat16"), (True, "bfloat16", "bfloat16")])
def test_precision_is_decided_from_the_flags_once(amp, amp_dtype, expected):
    precision = precision_from_flags(amp, amp_dtype)
    assert precision == expected
    assert uses_loss_scaling(precision) == (expected == "float16")


def test_only_float16_scales_the_loss():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cpu = torch.device("cpu")
    assert not isinstance(grad_scaler(cpu, "float16", optimizer), UnitScaler)
    scaler = grad_scaler(cpu, "bfloat16", optimizer)
    assert isinstance(scaler, UnitScaler) and scaler.get_scale() == 1.0
    loss = model(torch.tensor([[float("inf"), 0.0]])).sum()
    scaler.scale(loss).backward()
    before = model.weight.detach().clone()
    scaler.step(optimizer)  # gradients are not finite: skipped
    scaler.update()
    assert torch.equal(model.weight, before) and scaler.get_scale() == 1.0


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (59.6, "1:00"), (2579.6, "43:00"), (3725, "1:02:05")])
def test_durations_read_as_clock_times(seconds, text):
    assert format_duration(seconds) == text


def test_the_first_epoch_is_best_even_at_zero_score(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    precision = Precision(torch.device("cpu"))
    parts = StepParts(model, None, optimizer, scheduler, precision.grad_scaler(optimizer), precision)
    checkpointer = Checkpointer(parts, tmp_path, True, flags={}, score=("best_acc1", "top-1"))
    assert checkpointer.save_validated_on_all_ranks(0, 0.0)
    assert (tmp_path / "best.pth").exists()
    assert not checkpointer.save_validated_on_all_ranks(1, 0.0)
    assert load_checkpoint(tmp_path / "best.pth")["epoch"] == 0
    assert load_checkpoint(tmp_path / "checkpoint.pth")["precision"] == "float32"


def test_the_progress_line_gives_the_peak_memory_of_a_gpu_only(capsys):
    from common.log import ProgressLog
    progress = ProgressLog(print_freq=1)
    progress.start_epoch(0, 0, 1)
    for _ in progress.timed(iter([(torch.zeros(2),)])):
        progress.log(0, torch.tensor(1.0), torch.tensor(2.0), 0.1)
    line = capsys.readouterr().out
    assert line.startswith("Epoch: [0] [1/1]") and "img/s:" in line and "mem" not in line  # on the CPU
    assert progress.summary(0.1)["max_memory_mib"] is None
