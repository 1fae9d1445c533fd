"""Independent definitions the dense-prediction tests score pvtv2 against: mmsegmentation's evaluation
(``intersect_and_union`` + ``total_area_to_metrics``, ``slide_inference``), BTS's depth errors, and label maps written
in PIL's modes."""

import math

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def mmseg_scores(preds, labels, num_classes: int, ignore_index: int, reduce_zero_label: bool = False) -> dict:
    """``intersect_and_union`` summed over images, then ``total_area_to_metrics`` (aAcc, IoU, Acc, mIoU)."""
    totals = np.zeros((4, num_classes))  # intersect, union, pred, label
    for pred, label in zip(preds, labels):
        label = np.array(label, dtype=np.int64)
        if reduce_zero_label:  # mmsegmentation's way, on the 255 convention
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        keep = label != ignore_index
        pred, label = np.asarray(pred)[keep], label[keep]
        bins = dict(bins=num_classes, range=(0, num_classes))  # torch.histc(min=0, max=K - 1, bins=K)
        inter = np.histogram(pred[pred == label], **bins)[0]
        area_pred, area_label = np.histogram(pred, **bins)[0], np.histogram(label, **bins)[0]
        totals += [inter, area_pred + area_label - inter, area_pred, area_label]
    inter, union, _, area_label = totals
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        accuracy = inter.sum() / area_label.sum()
    return {"aAcc": accuracy, "IoU": iou,
            "mIoU": np.nanmean(iou) if not np.isnan(iou).all() else math.nan, "labelled": area_label.sum()}


def mmseg_slide(model, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """mmsegmentation's ``slide_inference``, written out."""
    _, _, h_img, w_img = image.shape
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds, count_mat = 0, torch.zeros(1, 1, h_img, w_img, dtype=torch.float64)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_img = image[:, :, y1:y2, x1:x2]
            logit = F.interpolate(model(crop_img).logits, size=crop_img.shape[2:], mode="bilinear", align_corners=False)
            preds = preds + F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat > 0).all()
    return preds / count_mat


def bts_metrics(pred: np.ndarray, gt: np.ndarray, lo: float, hi: float, crop: bool) -> dict | None:
    """BTS's ``compute_errors`` after its masking and clamping; Eigen's crop at the same fractions of the frame."""
    pred, gt = np.array(pred, dtype=np.float64), np.array(gt, dtype=np.float64)
    valid = (gt > lo) & (gt < hi)
    if crop:
        height, width = gt.shape
        inside = np.zeros_like(valid)
        inside[round(45 * height / 480):round(471 * height / 480), round(41 * width / 640):round(601 * width / 640)] = True
        valid &= inside
    if not valid.any():
        return None
    pred[np.isinf(pred) & (pred > 0)] = hi
    pred[np.isinf(pred) & (pred < 0)] = lo
    pred[np.isnan(pred)] = lo
    p, t = np.clip(pred, lo, hi)[valid], gt[valid]
    thresh = np.maximum(t / p, p / t)
    return {"abs_rel": np.mean(np.abs(t - p) / t), "sq_rel": np.mean((t - p) ** 2 / t),
            "rmse": np.sqrt(np.mean((t - p) ** 2)), "rmse_log": np.sqrt(np.mean((np.log(t) - np.log(p)) ** 2)),
            "log10": np.mean(np.abs(np.log10(t) - np.log10(p))), "delta1": np.mean(thresh < 1.25),
            "delta2": np.mean(thresh < 1.25**2), "delta3": np.mean(thresh < 1.25**3)}


def write_mask(path, values: np.ndarray, mode: str, rng: np.random.Generator) -> None:
    if mode == "P":
        image = PIL.Image.fromarray(values.astype(np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tolist())  # colours are not classes
    else:
        image = PIL.Image.fromarray(values.astype(np.uint8 if mode == "L" else np.uint16))
    image.save(path)
