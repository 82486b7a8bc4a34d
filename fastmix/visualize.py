"""Mixed-sample grids: what the Mix Block learned (originals, partners, masks, mixed images)."""
import numpy as np
import torch


@torch.no_grad()
def mix_grid(model, images, lam=0.5, index=None):
    """Rows of ``[x_i | x_j | mask of x_j | mixed]`` as a float array in [0, 1], HxWx3.

    ``images`` is a normalised float batch [n, C, H, W] on the model's device.
    """
    n = images.shape[0]
    index = torch.roll(torch.arange(n, device=images.device), 1) if index is None else index
    was_training = model.training
    model.eval()
    z = model.backbone_k(images)[0]
    mask = model.mix_block(z.float(), lam, index, images.shape[-2:])[:, 1:2]
    mixed = images * (1 - mask) + images[index] * mask
    model.train(was_training)

    def show(t):
        t = t.float()
        lo = t.amin(dim=(1, 2, 3), keepdim=True)
        hi = t.amax(dim=(1, 2, 3), keepdim=True)
        t = (t - lo) / (hi - lo).clamp_min(1e-6)
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t[:, :3]

    cols = [show(images), show(images[index]), mask.expand(-1, 3, -1, -1).float(), show(mixed)]
    rows = torch.cat([torch.cat(list(c), dim=2) for c in zip(*cols)], dim=1)  # [3, nH, 4W]
    return rows.permute(1, 2, 0).cpu().numpy()


def save_mix_grid(model, dataset, path, device, n=8, lam=0.5, channels_last=False):
    """Save a PNG grid for the first ``n`` images of an ArrayDataset (λ written in the name).

    Encoded in memory and written atomically (``fastmix.checkpoint.atomic_write``): a full disk
    raises an OSError that names the cause and leaves no truncated PNG."""
    import io

    from PIL import Image

    from fastmix.checkpoint import atomic_write
    x = dataset.images[:n].float().to(device)
    mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1) * 255
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grid = mix_grid(model, x, lam)
    img = Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8))
    scale = max(1, 256 // x.shape[-1])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img = _with_header(img, ["image x_i", "partner x_j", "mask of x_j", f"mixed (lam={lam:g})"])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getbuffer())
    return path


def _with_header(img, titles, height=18):
    """``img`` under a white strip naming its equal-width columns."""
    from PIL import Image, ImageDraw
    out = Image.new("RGB", (img.width, img.height + height), "white")
    out.paste(img, (0, height))
    draw = ImageDraw.Draw(out)
    w = img.width / len(titles)
    for i, t in enumerate(titles):
        draw.text((int(i * w) + 4, 3), t, fill="black")
    return out
