"""Top-1 / top-5 accuracy of a classifier on a dataset."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from distill.data import collate_skipping
from students.backends import DTYPES


def eval_loader(data: Dataset, batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0,
                persistent: bool = False) -> DataLoader:
    """Test images in order; `persistent` keeps the decoding workers for the next evaluation (a
    trainer scores the same test set every epoch)."""
    return DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping,
                      pin_memory=torch.device(device).type == "cuda", persistent_workers=persistent and num_workers > 0)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: Dataset | DataLoader, batch_size: int = 256,
             device: str | torch.device = "cpu", num_workers: int = 0, precision: str = "fp32",
             channels_last: bool = False) -> dict[str, float]:
    """Top-1/top-5 and mean CE; the forward in the run's `precision` (autocast, as timm's validate
    --amp) and memory format, the scores in fp32."""
    was_training = model.training
    device = torch.device(device)
    dtype = DTYPES[precision]
    model.eval()
    correct1 = correct5 = n = 0
    loss = 0.0
    loader = data if isinstance(data, DataLoader) else eval_loader(data, batch_size, device, num_workers)
    for batch in loader:
        if batch is None:  # every image of it failed to decode (data.on_bad_image: skip)
            continue
        images, targets, _ = batch
        images, targets = images.to(device).float() / 255, targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images).float()
        loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), 1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(1).sum().item()
        n += len(targets)
    model.train(was_training)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss / n}
