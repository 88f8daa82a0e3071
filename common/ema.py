"""--model-ema: an exponential moving average of the weights, evaluated and saved beside them."""
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.checkpoint import unwrap


class EMA(AveragedModel):
    """Exponential moving average of weights and buffers; during the LR warmup it copies the model (the early
    weights are not worth keeping). The decay is rescaled as torchvision's reference does, so the
    --model-ema-decay of its published recipes means the same here."""

    def __init__(self, model, decay, every, images_per_step, epochs, warmup_epochs):
        alpha = min(1.0, (1 - decay) * images_per_step * every / epochs)
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(1 - alpha), use_buffers=True)
        for module in self.module.modules():  # never trained: no forwards checkpointed by --grad-checkpointing
            vars(module).pop("forward", None)
        self.every, self.warmup_epochs = every, warmup_epochs

    def update(self, model, epoch, step):
        """Every `every` steps of an epoch, as torchvision counts them."""
        if step % self.every:
            return
        self.update_parameters(unwrap(model))
        if epoch < self.warmup_epochs:
            self.n_averaged.fill_(0)
