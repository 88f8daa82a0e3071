"""--max-bad-samples N: a training file that fails to load mid-run is replaced by a stand-in sample, counted, and
listed; imported only when N > 0 (with 0, a file that fails to load stops the run with one line naming it)."""
import os

import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from common.data import BatchesThrough, derive_seed, shown
from common.log import SampleError, UserError, in_process_group, is_main_process, launch_rank, print0
from common.output_dir import unwritable_output

CHECK_DATA_HINT = "python tools/check_data.py with the same data flags finds every bad file at once"


def stand_in_index(seed, index, size, tried=()):
    """The sample that stands in for `index`, which failed to load: drawn from (seed, index) alone, every other
    index equally likely. A chain of stand-ins that failed too never comes back to one it `tried`: the next
    index after the drawn one that it has not tried is taken instead. None once it has tried them all."""
    if size < 2:
        return None
    other = derive_seed("stand-in", seed, index) % (size - 1)
    drawn = other + (other >= index)
    return next((candidate % size for candidate in range(drawn, drawn + size)
                 if candidate % size != index and candidate % size not in tried), None)


class SkipBadSamples(Dataset):
    """--max-bad-samples: (*sample, reports), a failing sample replaced by a stand-in chosen from the seed and its
    index alone, so every rank, worker and resumed run replaces it alike. The reports of (index, path, error)
    travel with the batch: DataLoader workers share no memory with the main process. A stand-in can fail too,
    and is replaced in turn; a chain of more than `limit` failures, or one that has tried every sample, stops the
    run with a line that names its files."""

    def __init__(self, dataset, seed, limit):
        self.dataset, self.seed, self.limit = dataset, seed, limit

    def __len__(self):
        return len(self.dataset)

    def path(self, index):
        return self.dataset.path(index)

    def __getitem__(self, index):
        index %= len(self.dataset)  # repeated augmentation's copies (TrainingSampler): index + copy * len
        try:
            return (*self.dataset[index], ())
        except SampleError as e:
            return self.stand_in([(index, shown(self.dataset.path(index)), str(e))])

    def stand_in(self, chain):
        """(*sample, chain) of the first readable stand-in for the last sample of `chain`, the reports of samples
        that failed in turn, grown by the stand-ins that failed too."""
        chain = list(chain)
        while True:
            index = stand_in_index(self.seed, chain[-1][0], len(self.dataset), {index for index, *_ in chain})
            if len(chain) > self.limit or index is None:
                raise SampleError(self.chain_failure(chain))
            try:
                return (*self.dataset[index], tuple(chain))
            except SampleError as e:
                chain.append((index, shown(self.dataset.path(index)), str(e)))

    def chain_failure(self, chain):
        """The line of a chain of stand-ins that found no readable sample, its files named."""
        tried = ", ".join(path for _, path, _ in chain[:5]) + (f" and {len(chain) - 5} more" if len(chain) > 5 else "")
        if len(chain) > self.limit:
            why = (f"{len(chain)} files failed in turn, each standing in for the one before ({tried}): more than "
                   f"--max-bad-samples {self.limit} allows")
        else:
            why = (f"every one of the {len(self.dataset)} training samples failed to load ({tried}): --max-bad-samples "
                   f"{self.limit} replaces a bad file by a readable one, and there is none")
        return f"{chain[-1][2]} ({why}; {CHECK_DATA_HINT})"


def collate_reported(batch):
    *samples, reports = zip(*batch)
    return (*default_collate(list(zip(*samples))), list(reports))


class BadSamples:
    """The training samples whose files failed to load (--max-bad-samples N), each counted once on all ranks and
    across resumes. A rank stops at once when it alone sees more than N; the ranks agree on the whole count in
    agree(), which the Checkpointer calls at every save."""

    FILE = "bad_samples.txt"

    def __init__(self, limit, output_dir=None):
        self.limit, self.output_dir = limit, output_dir
        self.known = {}  # sample index -> (path, error), agreed by every rank
        self.new = {}  # met by this rank since the last agreement

    def stand_ins(self, dataset, seed):
        return SkipBadSamples(dataset, seed, self.limit) if self.limit else dataset

    @property
    def collate(self):
        return collate_reported if self.limit else None

    def reported(self, loader):
        """`loader` whose batches hand their reports over as each is trained on, so that a checkpoint counts
        exactly the batches it has trained."""
        return BatchesThrough(loader, self.take_reports) if self.limit else loader

    def take_reports(self, *batch_and_reports):
        *batch, reports = batch_and_reports
        self.record(reports)
        return tuple(batch)

    def record(self, reports):
        for index, path, error in (report for sample in reports for report in sample):
            if index in self.known or index in self.new:
                continue  # met before, in an earlier epoch or by another copy of --ra-sampler
            self.new[index] = (path, error)
            rank, count = launch_rank(), len(self.known) + len(self.new)
            print(f"note{'' if rank == 0 else f' (rank {rank})'}: {error}; skipped, a stand-in sample is trained on "
                  f"instead (bad sample {count} of at most {self.limit})", flush=True)
            if count > self.limit:
                if is_main_process():
                    self.write({**self.known, **self.new})
                raise SampleError(self.too_many(error, count))

    def agree(self):
        """A collective: call it on every rank at the same points."""
        if not self.limit:
            return
        gathered = [self.new]
        if in_process_group() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.new)
        merged = {index: report for new in gathered for index, report in new.items()}
        for index in sorted(merged):  # the same order on every rank and in every run
            self.known.setdefault(index, merged[index])
        self.new = {}
        if is_main_process():
            self.write(self.known)
        if len(self.known) > self.limit:
            raise UserError(self.too_many(next(reversed(self.known.values()))[1], len(self.known)))

    def too_many(self, error, count):
        listed = f"; those met so far are in {os.path.join(self.output_dir, self.FILE)}" if self.output_dir else ""
        return f"{error} (bad sample {count} of this run, more than --max-bad-samples {self.limit} allows{listed}; " \
               f"{CHECK_DATA_HINT})"

    def write(self, known):
        if not (self.output_dir and known):
            return
        path = os.path.join(self.output_dir, self.FILE)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.writelines(f"{report_path}\t{error}\n" for report_path, error in known.values())
            os.replace(tmp, path)
        except OSError as e:  # a full disk, the output folder deleted under the run
            if os.path.exists(tmp):
                os.remove(tmp)
            raise UserError(unwritable_output(path, e, self.output_dir)) from None

    def state(self):
        """For the checkpoint: plain lists, which weights_only loading reads."""
        return [[index, path, error] for index, (path, error) in self.known.items()]

    def load_state(self, state):
        self.known = {index: (path, error) for index, path, error in state or []}
        if len(self.known) > self.limit:
            raise UserError(f"the checkpoint counts {len(self.known)} bad samples, more than --max-bad-samples "
                            f"{self.limit}: resume with --max-bad-samples {len(self.known)} or more")
        if self.known:
            print0(f"{len(self.known)} bad samples met before this resume count towards --max-bad-samples "
                   f"{self.limit}")
