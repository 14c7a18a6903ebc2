"""Attention helpers of CMAL-Net and its learning-rate schedule.

Same results as the reference's per-sample loops, computed for the whole batch at once and
without host synchronisation: boxes stay tensors, and each crop is resized by gathering the
rows and columns that bilinear interpolation (align_corners=True) would read.
"""
import math

import torch
import torch.nn.functional as F


def cosine_anneal_schedule(t, nb_epoch, lr):
    return float(lr / 2 * (math.cos(math.pi * (t % nb_epoch) / nb_epoch) + 1))


def map_generate(attention_map, pred, p1, p2):
    """Class activation map through the expert's two Linear layers.

    out[b] = p2[c] @ (p1 @ attention_map[b]) with c = argmax pred[b]; (B, C, h, w) -> (B, h, w).
    """
    # float32 even inside autocast: the crop boxes must not depend on the precision setting.
    with torch.autocast(attention_map.device.type, enabled=False):
        w = p2[pred.argmax(1)].float() @ p1.float()  # (B, C): p2[c] @ p1, one row per sample
        return torch.einsum("bc,bchw->bhw", w, attention_map.float())


def normalised_map(maps, size):
    """Attention maps (B, h, w) as the crops see them: bilinear (align_corners=True) to `size`,
    then per-sample min-max to [0, 1)."""
    m = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear",
                      align_corners=True).squeeze(1)
    return normalise(m)


def normalise(m):
    """Per-sample min-max of (B, H, W) maps."""
    lo = m.amin((1, 2), keepdim=True)
    hi = m.amax((1, 2), keepdim=True)
    return (m - lo) / (hi - lo + 1e-6)


def _span(any_along, padding, size):
    """Start and end (exclusive) of the padded True run of each row of `any_along` (B, size).

    As the reference: max(int(first - padding), 0) and min(int(last + padding), size), where
    int() truncates toward zero. Computed in float64 like Python's arithmetic.
    """
    idx = torch.arange(size, device=any_along.device)
    first = torch.where(any_along, idx, size).amin(1).double()
    last = torch.where(any_along, idx, -1).amax(1).double()
    start = torch.trunc(first - padding).clamp(min=0).long()
    end = torch.trunc(last + padding).clamp(max=size).long()
    return start, end


def _boxes(mask, finite, padding_ratio):
    """Per-sample crop boxes of `mask` (B, H, W); the whole image where the mask is empty, the map
    not finite, or the padded box degenerate (where the reference would crash)."""
    _, H, W = mask.shape
    top, bottom = _span(mask.any(2), padding_ratio * H, H)
    left, right = _span(mask.any(1), padding_ratio * W, W)
    whole = ~mask.flatten(1).any(1) | ~finite | (bottom <= top) | (right <= left)
    zeros = torch.zeros_like(top)
    top, left = torch.where(whole, zeros, top), torch.where(whole, zeros, left)
    bottom, right = torch.where(whole, zeros + H, bottom), torch.where(whole, zeros + W, right)
    return top, bottom, left, right


def _source_positions(start, end, size):
    """Indices and weights with which align_corners=True bilinear resizing of [start, end) to
    `size` samples reads its input, as PyTorch's CPU kernel computes them (float32)."""
    length = (end - start).float()
    scale = (length - 1) / (size - 1) if size > 1 else torch.zeros_like(length)
    real = scale[:, None] * torch.arange(size, device=start.device, dtype=torch.float32)
    i0 = torch.minimum(real.floor().long(), (end - start - 1)[:, None])
    lam1 = (real - i0).clamp(0, 1)
    i1 = i0 + (i0 < (end - start - 1)[:, None]).long()
    return start[:, None] + i0, start[:, None] + i1, 1 - lam1, lam1


def _gather(x, dim, index):
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    return x.gather(dim, index.view(view).expand(shape))


def crop_and_resize(images, top, bottom, left, right):
    """images[b, :, top:bottom, left:right] resized back to (H, W), bilinear, align_corners=True."""
    _, _, H, W = images.shape
    r0, r1, rw0, rw1 = _source_positions(top, bottom, H)
    c0, c1, cw0, cw1 = _source_positions(left, right, W)
    x = images.float()
    rows0, rows1 = _gather(x, 2, r0), _gather(x, 2, r1)
    cw0, cw1 = cw0[:, None, None, :], cw1[:, None, None, :]
    top_row = cw0 * _gather(rows0, 3, c0) + cw1 * _gather(rows0, 3, c1)
    bottom_row = cw0 * _gather(rows1, 3, c0) + cw1 * _gather(rows1, 3, c1)
    out = rw0[:, None, :, None] * top_row + rw1[:, None, :, None] * bottom_row
    return out.to(images.dtype)


def _finite(*maps):
    return torch.stack([m.flatten(1).isfinite().all(1) for m in maps]).all(0)


def attention_box(attention_map, size, theta=0.5, padding_ratio=0.1):
    """(top, bottom, left, right) of one expert's attention box on an image of `size` (H, W)."""
    norm = normalised_map(attention_map, size)
    return _boxes(norm >= theta, _finite(attention_map), padding_ratio)


def joint_map(m1, m2, m3, size):
    """The three experts' normalised maps, summed and normalised again."""
    return normalise(sum(normalised_map(m, size) for m in (m1, m2, m3)))


def highlight_box(m1, m2, m3, size, theta=0.5, padding_ratio=0.1):
    """The box of the experts' joint map."""
    return _boxes(joint_map(m1, m2, m3, size) >= theta, _finite(m1, m2, m3), padding_ratio)


def attention_im(images, attention_map, theta=0.5, padding_ratio=0.1):
    """Crop each image to where its attention map is at least `theta` (after min-max
    normalisation), pad by `padding_ratio` of the side, and resize back to full size."""
    box = attention_box(attention_map.detach(), images.shape[2:], theta, padding_ratio)
    return crop_and_resize(images, *box)


def highlight_im(images, attention_map, attention_map2, attention_map3, theta=0.5,
                 padding_ratio=0.1):
    """Crop each image to the region the three experts attend to together."""
    box = highlight_box(attention_map.detach(), attention_map2.detach(), attention_map3.detach(),
                        images.shape[2:], theta, padding_ratio)
    return crop_and_resize(images, *box)
