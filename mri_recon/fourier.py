"""Centred, orthonormal 2-D Fourier transforms as fastMRI stores k-space, and the image helpers around
them."""

import torch


def fft2c(x):
    """(..., H, W) complex image -> centred k-space."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(k):
    """(..., H, W) centred k-space -> complex image."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(k, norm="ortho"), dim=(-2, -1))


def rss(coil_images, dim=-3):
    """Root sum of squares over the coil dimension: (B, C, H, W) complex -> (B, H, W) real."""
    return coil_images.abs().pow(2).sum(dim).sqrt()


def center_crop(x, shape):
    """Crop the last two dims of x to shape (h, w) around the centre."""
    h, w = shape
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"cannot crop an image of {H}x{W} to {h}x{w}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]
