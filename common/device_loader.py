"""The fast input path (--data-backend gpu): the main process turns what DataLoader workers read into batches on
the device, one batch ahead on a side stream (classification/gpu_preset.py decodes JPEGs with nvJPEG there,
segmentation/gpu_augment.py augments images and masks). Imported only with --data-backend gpu."""
import queue
import threading

import torch

from common.data import derive_seed


def batch_generator(seed, epoch, step, slot):
    return torch.Generator().manual_seed(derive_seed("batch", seed, epoch, step, slot))


class DeviceLoader:
    """Wraps a DataLoader of encoded batches: yields what `prepare(batch, generator)` makes of each batch,
    prepared one batch ahead on a side CUDA stream by a background thread (decoding blocks its thread).

    Each batch's randomness comes from a generator seeded by (seed, epoch, step, slot): its place in the run
    and in the step's global batch (common/data.py), so a run resumed mid-epoch, also on another number of
    processes with the same per-process batch, prepares the remaining batches as an uninterrupted one.
    """

    def __init__(self, loader, prepare, device, seed, after=None, threaded=True, depth=2):
        # `after` (MixUp/CutMix) runs in the training thread: it draws from torch's global random stream,
        # which the loop reseeds every step and which a second thread would disturb.
        self.loader, self.prepare, self.device, self.seed, self.depth = loader, prepare, device, seed, depth
        self.after = after or (lambda images, targets: (images, targets))
        # A `prepare` that draws from the global stream itself (torchvision's v2 transforms do) must stay
        # in the training thread too: threaded=False.
        self.threaded = threaded
        self.sampler, self.dataset, self.batch_size = loader.sampler, loader.dataset, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def generator(self, batch_index):
        if not hasattr(self.sampler, "position"):  # evaluation: nothing is drawn
            return None
        return batch_generator(self.seed, self.sampler.epoch, *self.sampler.position(batch_index))

    def finish(self, prepared):
        """`after` on the prepared images and targets; what else the batch carries (bad-sample reports) follows."""
        images, targets, *rest = prepared
        return (*self.after(images, targets), *rest)

    def __iter__(self):
        # The DataLoader's iterator is made here, when the training loop asks for it, in the training thread:
        # making it draws the workers' base seed from torch's global stream, which the loop has just seeded.
        batches = iter(self.loader)
        if self.device.type != "cuda" or not self.threaded:
            return (self.finish(self.prepare(batch, self.generator(index))) for index, batch in enumerate(batches))
        return self.prefetched(batches)

    def prefetched(self, batches):
        ready = queue.Queue(maxsize=self.depth)
        stream = torch.cuda.Stream(self.device)
        stop = threading.Event()

        def produce():
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(stream):
                    for index, batch in enumerate(batches):
                        if stop.is_set():
                            return
                        prepared = self.prepare(batch, self.generator(index))
                        done = torch.cuda.Event()
                        done.record(stream)
                        ready.put((prepared, done))
                ready.put(None)
            except BaseException as e:  # re-raised in the training thread, which reports it
                ready.put(e)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                prepared, done = item
                torch.cuda.current_stream(self.device).wait_event(done)
                for tensor in prepared[:2]:  # made on the side stream, used on the main one
                    tensor.record_stream(torch.cuda.current_stream(self.device))
                yield self.finish(prepared)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.1)

