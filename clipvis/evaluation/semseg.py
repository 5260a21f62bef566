"""Semantic-segmentation metric of CLIPtrase (its ``scores``): confusion matrix, pAcc, mAcc, fwIoU, mIoU."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def confusion_matrix(gt, pred, num_classes: int) -> np.ndarray:
    """GT and prediction (any equal shapes, integer) -> int64 [n, n] (rows = GT). Pixels whose GT is
    outside [0, n) are ignored; predictions are not range-checked (as the original)."""
    g = np.asarray(gt.cpu() if torch.is_tensor(gt) else gt).reshape(-1).astype(np.int64)
    p = np.asarray(pred.cpu() if torch.is_tensor(pred) else pred).reshape(-1).astype(np.int64)
    if g.shape != p.shape:
        raise ValueError(f"GT has {g.size} pixels, prediction {p.size}")
    keep = (g >= 0) & (g < num_classes)
    return np.bincount(num_classes * g[keep] + p[keep], minlength=num_classes ** 2).reshape(num_classes, num_classes)


def accumulate_confusion(pairs: Iterable, num_classes: int) -> np.ndarray:
    """Sum of confusion_matrix over (gt, pred) pairs -> int64 [n, n]."""
    hist = np.zeros((num_classes, num_classes), dtype=np.int64)
    for gt, pred in pairs:
        hist += confusion_matrix(gt, pred, num_classes)
    return hist


def iou_per_class(hist: np.ndarray) -> np.ndarray:
    """Confusion matrix [n, n] -> IoU per class [n] (float64): diag / (row + column - diag + 0.01)."""
    hist = np.asarray(hist)
    diag = np.diag(hist)
    return diag / (hist.sum(axis=1) + hist.sum(axis=0) - diag + 0.01)


def semseg_scores(hist: np.ndarray) -> dict:
    """Confusion matrix [n, n] -> {'pAcc', 'mAcc', 'fwIoU', 'mIoU'} in percent rounded to 2 decimals
    (numpy float64). mAcc averages diag / (row + 0.01) over all n classes; mIoU and fwIoU use only the
    classes present in the GT (row sum > 0)."""
    hist = np.asarray(hist)
    diag = np.diag(hist)
    rows = hist.sum(axis=1)
    pacc = diag.sum() / hist.sum()
    macc = np.mean(diag / (rows + 0.01))
    iou = iou_per_class(hist)
    present = rows > 0
    miou = np.mean(iou[present])
    freq = rows / hist.sum()
    fwiou = (freq[freq > 0] * iou[freq > 0]).sum()
    return {name: np.round(value * 100, 2) for name, value in
            (("pAcc", pacc), ("mAcc", macc), ("fwIoU", fwiou), ("mIoU", miou))}
