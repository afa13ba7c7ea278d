"""The networks: U-Net, E2E-VarNet (sensitivity estimation + unrolled cascades), the baselines built from them
(U-Net on the zero-filled image, E2E-VarNet), a light T2T-ViT, and the two trainable ends of the Nirvana MRI
pipeline: the k-space encoder (VarNet cascades -> T2T-ViT -> d_model tokens) and the image decoder
(image-query tokens -> U-Net -> magnitude image)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from mri_recon.fourier import center_crop, fft2c, ifft2c, rss


class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.LeakyReLU(0.2),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.LeakyReLU(0.2),
        )


class UNet(nn.Module):
    """The standard U-Net: num_pools 2x average-pool downs, transposed-conv ups, skip concatenations."""

    def __init__(self, cin, cout, chans, num_pools):
        super().__init__()
        widths = [chans * 2**i for i in range(num_pools + 1)]
        self.downs = nn.ModuleList(
            [ConvBlock(cin, widths[0])] + [ConvBlock(a, b) for a, b in zip(widths, widths[1:])]
        )
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:])][::-1]
        )
        self.up_convs = nn.ModuleList([ConvBlock(2 * a, a) for a in widths[:-1]][::-1])
        self.head = nn.Conv2d(widths[0], cout, 1)
        self.multiple = 2**num_pools

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W)
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.multiple, 0, -H % self.multiple))
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.ups, self.up_convs):
            x = conv(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :H, :W]


class NormUNet(nn.Module):
    """U-Net on a complex image seen as 2 real channels, normalised per image (mean/std) and back."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = UNet(2, 2, chans, num_pools)

    def forward(self, x):  # (B, H, W) complex -> (B, H, W) complex
        x = torch.view_as_real(x).permute(0, 3, 1, 2)  # (B, 2, H, W)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        x = self.unet((x - mean) / std) * std + mean
        return torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous())


def sens_expand(image, sens):  # (B,H,W) x (B,C,H,W) -> k-space (B,C,H,W)
    return fft2c(image.unsqueeze(1) * sens)


def sens_reduce(kspace, sens):  # (B,C,H,W) -> coil-combined image (B,H,W)
    return (ifft2c(kspace) * sens.conj()).sum(1)


def centre_lines(mask):
    """(B, W) bool -> (B, W) bool: the contiguous sampled run around the centre column (the ACS lines)."""
    c = mask.shape[-1] // 2
    right = mask[:, c:].long().cumprod(-1)
    left = mask[:, : c + 1].flip(-1).long().cumprod(-1).flip(-1)[:, :-1]
    return torch.cat([left, right], dim=-1).bool()


class SensitivityModel(nn.Module):
    """E2E-VarNet's sensitivity estimation: ACS lines -> coil images -> NormUNet per coil -> divide by RSS."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = NormUNet(chans, num_pools)

    def forward(self, kspace, mask):  # (B,C,H,W), (B,W) -> (B,C,H,W) complex
        B, C, H, W = kspace.shape
        coil_images = ifft2c(kspace * centre_lines(mask)[:, None, None, :])
        maps = self.unet(coil_images.reshape(B * C, H, W)).reshape(B, C, H, W)
        return maps / rss(maps, dim=1).unsqueeze(1).clamp_min(1e-12)


class VarNetCascade(nn.Module):
    """k <- k - dc_weight * mask * (k - k0) - E(U-Net(R(k))): one unrolled gradient step with a learned
    prior."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = NormUNet(chans, num_pools)
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, k, k0, mask, sens):  # mask (B,1,1,W)
        return k - self.dc_weight * mask * (k - k0) - sens_expand(self.unet(sens_reduce(k, sens)), sens)


class E2EVarNet(nn.Module):
    """End-to-end VarNet (Sriram et al. 2020): sensitivity estimation + cascades, output RSS cropped to the
    target."""

    def __init__(self, cascades, chans, sens_chans, num_pools=2):
        super().__init__()
        self.sens = SensitivityModel(sens_chans, num_pools)
        self.cascades = nn.ModuleList([VarNetCascade(chans, num_pools) for _ in range(cascades)])

    def refine(self, kspace, mask):  # -> refined k-space (B,C,H,W), sens maps
        sens = self.sens(kspace, mask)
        m, k = mask[:, None, None, :].to(kspace.real.dtype), kspace
        for cascade in self.cascades:
            k = cascade(k, kspace, m, sens)
        return k, sens

    def forward(self, kspace, mask, out_shape):  # -> (B, h, w)
        k, _ = self.refine(kspace, mask)
        return center_crop(rss(ifft2c(k)), out_shape)


def zero_filled(kspace, out_shape):
    """The zero-filled reconstruction: RSS of the inverse FFT of the masked k-space, cropped."""
    return center_crop(rss(ifft2c(kspace)), out_shape)


class UNetBaseline(nn.Module):
    """U-Net on the zero-filled magnitude image, normalised per image."""

    def __init__(self, chans, num_pools):
        super().__init__()
        self.unet = UNet(1, 1, chans, num_pools)

    def forward(self, kspace, mask, out_shape):
        x = zero_filled(kspace, out_shape).unsqueeze(1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return (self.unet((x - mean) / std) * std + mean).squeeze(1)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (attention + MLP), non-causal."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # (B, N, dim)
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


def sincos_2d(gh, gw, dim, device):
    """(gh*gw, dim) fixed 2-D sine-cosine position embedding (works for any grid size)."""
    f = 1.0 / 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    y, x = y.reshape(-1, 1) * f, x.reshape(-1, 1) * f
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


class T2TViT(nn.Module):
    """A light Tokens-to-Token ViT (Yuan et al. 2021): soft split 7/4, then re-structurise + soft split 3/2 (a
    small transformer layer between splits) until the tokens' stride is `stride` (4, 8 or 16: one, two or three
    splits), then `depth` ViT blocks. (B, cin, H, W) -> (B, N, dim), N = ceil(H/stride) * ceil(W/stride)."""

    STRIDES = (4, 8, 16)

    def __init__(self, cin, dim, depth, heads, token_dim=32, stride=16):
        super().__init__()
        if stride not in self.STRIDES:
            raise ValueError(f"T2T-ViT stride {stride} is not one of {self.STRIDES}")
        n_splits = self.STRIDES.index(stride) + 1
        self.splits = nn.ModuleList(
            [
                nn.Unfold(7, stride=4, padding=2),
                nn.Unfold(3, stride=2, padding=1),
                nn.Unfold(3, stride=2, padding=1),
            ][:n_splits]
        )
        self.t2t_in = nn.ModuleList(
            [nn.Linear(cin * 49, token_dim), nn.Linear(token_dim * 9, token_dim)][: n_splits - 1]
        )
        self.t2t_blocks = nn.ModuleList([Block(token_dim, 1) for _ in range(n_splits - 1)])
        self.project = nn.Linear(token_dim * 9 if n_splits > 1 else cin * 49, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        H, W = x.shape[-2:]
        for split, proj, block in zip(self.splits, self.t2t_in, self.t2t_blocks):
            t = split(x).transpose(1, 2)  # (B, L, c*k*k)
            H, W = self.grid_after(split, H, W)
            t = block(proj(t))  # (B, L, token_dim)
            x = t.transpose(1, 2).reshape(t.shape[0], -1, H, W)  # re-structurise to a grid
        t = self.project(self.splits[-1](x).transpose(1, 2))  # (B, N, dim)
        H, W = self.grid_after(self.splits[-1], H, W)
        t = t + sincos_2d(H, W, t.shape[-1], t.device)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    @staticmethod
    def grid_after(split, H, W):
        k, s, p = split.kernel_size, split.stride, split.padding
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def n_tokens(self, H, W):
        """Tokens out of an H x W input."""
        for split in self.splits:
            H, W = self.grid_after(split, H, W)
        return H * W


def kspace_layer_norm(kspace, mask):
    """LayerNorm before the encoder (Sec. 3.2.2), on k-space: divide by the RMS of the sampled entries.
    No mean-centring (it would fill the unsampled lines) and no affine; returns (normalised, scale (B,))."""
    B, C, H, W = kspace.shape
    n_sampled = mask.sum(-1).clamp_min(1) * C * H  # (B,)
    scale = (kspace.abs().pow(2).sum(dim=(1, 2, 3)) / n_sampled).sqrt().clamp_min(1e-12)
    return kspace / scale.reshape(B, 1, 1, 1), scale


class SliceStandardise(nn.Module):
    """Batch norm over slices for the k-space tokens (mri.py --kspace-token-norm batch; not in the paper).
    (B, N, d) -> (B, N, d): every token feature minus its mean over the batch's slices (per token position),
    divided by the feature's std over slices (pooled over positions), times `scale` (the backbone's embedding
    RMS). What is left is only what differs between slices, at the size of a word embedding, whatever the
    encoder's weights: stage 1 cannot make the tokens the same for every slice by shrinking their differences.
    Batch statistics while gradients flow in training mode (stage 1's steps); otherwise the stored ones, an
    exponential average until `calibrate` sets them from a pass over the training slices."""

    def __init__(self, n_tokens, dim, scale, momentum=0.1, eps=1e-12):
        super().__init__()
        self.scale, self.momentum, self.eps = scale, momentum, eps
        self.register_buffer("mean", torch.zeros(n_tokens, dim))
        self.register_buffer("var", torch.ones(dim))

    @staticmethod
    def statistics(x):
        """(B, N, d) -> the mean over slices (N, d) and the variance over slices pooled over positions (d,)."""
        mean = x.mean(0)
        return mean, (x - mean).pow(2).mean((0, 1)) * x.shape[0] / max(1, x.shape[0] - 1)

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and x.shape[0] > 1:
            mean, var = self.statistics(x)
            with torch.no_grad():
                self.mean.lerp_(mean, self.momentum)
                self.var.lerp_(var, self.momentum)
        else:
            mean, var = self.mean, self.var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.scale

    @torch.no_grad()
    def calibrate(self, tokens):  # tokens (S, N, d): the encoder's projections of S training slices
        mean, var = self.statistics(tokens)
        self.mean.copy_(mean)
        self.var.copy_(var)


class KspaceEncoder(nn.Module):
    """LayerNorm -> VarNet cascades with sensitivity estimation -> light T2T-ViT -> Linear to d_model.
    The cascades' coil-combined image (`image_estimate`) is what the ViT tokenises; stage 0 trains the
    cascades to make it a reconstruction, as the E2E-VarNet baseline is trained."""

    def __init__(
        self,
        d_model,
        out_shape,
        cascades,
        chans,
        sens_chans,
        vit_dim,
        vit_depth,
        vit_heads,
        vit_stride=16,
        token_norm_scale=None,
    ):
        super().__init__()
        self.out_shape = out_shape
        self.varnet = E2EVarNet(cascades, chans, sens_chans)
        self.vit = T2TViT(3, vit_dim, vit_depth, vit_heads, stride=vit_stride)
        self.to_model = nn.Linear(vit_dim, d_model)
        # token_norm_scale: the tokens standardised over slices to this RMS (SliceStandardise); None: the
        # projection as it is (the paper's encoder)
        self.token_norm = None
        if token_norm_scale is not None:
            self.token_norm = SliceStandardise(self.vit.n_tokens(*out_shape), d_model, token_norm_scale)

    def non_cascade_parameters(self):  # the T2T-ViT and the projection to d_model
        return list(self.vit.parameters()) + list(self.to_model.parameters())

    def coil_estimate(self, kspace, mask):
        """The cascades' estimate: the k-space normalised by kspace_layer_norm, k0 (B, C, H, W), its scale (B,),
        the sensitivity maps S (B, C, H, W) and the coil-combined image (B, H, W) complex, uncropped."""
        k0, scale = kspace_layer_norm(kspace, mask)
        refined, sens = self.varnet.refine(k0, mask)
        return k0, scale, sens, sens_reduce(refined, sens)

    def image_estimate(self, kspace, mask):  # -> (B, h, w) complex in units of the k-space scale, scale (B,)
        _, scale, _, image = self.coil_estimate(kspace, mask)
        return center_crop(image, self.out_shape), scale

    def reconstruct(self, kspace, mask):  # stage 0's output: the magnitude image (B, h, w)
        image, scale = self.image_estimate(kspace, mask)
        return image.abs() * scale.reshape(-1, 1, 1)

    def projected_tokens(self, kspace, mask):  # -> the projection to d_model (B, N, d_model), image, scale
        image, scale = self.image_estimate(kspace, mask)
        features = torch.stack([image.real, image.imag, image.abs()], dim=1)
        return self.to_model(self.vit(features)), image, scale

    def forward(self, kspace, mask):  # -> k-space tokens (B, N, d_model), image (B, h, w) complex, scale (B,)
        tokens, image, scale = self.projected_tokens(kspace, mask)
        return (tokens if self.token_norm is None else self.token_norm(tokens)), image, scale

    def data_consistency_inputs(self, kspace, mask):
        """What the data-consistency step needs of each slice, none of it trained after stage 1 (stage 2 keeps
        it per slice rather than run the cascades at every step): coil_estimate's k0, maps and image, and the
        mask (B, W)."""
        k0, _, sens, image = self.coil_estimate(kspace, mask)
        return k0, mask, sens, image

    def data_consistency(self, magnitude, k0, mask, sens, image):
        """Hard data consistency after the decoder (not in the paper; mri.py --data-consistency). magnitude
        (B, h, w) in units of the k-space scale gets the phase of the cascades' coil-combined image and takes
        its place inside that image's field of view (the encoder's image stays outside the crop); with the
        encoder's sensitivity maps S its coil k-space is F(S x), of which the sampled lines are replaced by
        the measured ones: k = (1 - m) F(S x) + m k0. k0, mask, sens, image: data_consistency_inputs of the
        slices. -> the RSS of k's coil images cropped to (B, h, w), in units of the k-space scale, as
        E2E-VarNet's output."""
        crop = center_crop(image, self.out_shape)
        x = image.clone()  # the encoder's image outside the crop, the decoder's with its phase inside
        center_crop(x, self.out_shape).copy_(magnitude * crop / crop.abs().clamp_min(1e-12))
        k = torch.where(mask[:, None, None, :].bool(), k0, sens_expand(x, sens))
        return center_crop(rss(ifft2c(k)), self.out_shape)


class ImageDecoder(nn.Module):
    """LayerNorm -> Linear to patch pixels -> reshape to the image grid -> U-Net -> magnitude image.
    (B, M, d_model) image tokens, M = (h/patch) * (w/patch) -> (B, h, w), in units of the k-space scale.
    Before the LayerNorm, tokens are standardised per (query, feature) with training-set statistics (fixed
    buffers, set once in stage 2): a frozen backbone's image tokens share a large input-independent part, and
    what depends on the k-space is ~0.1-1% of it at init, too small for the LayerNorm alone to expose.
    image_skip (an ablation, not the paper's decoder): the U-Net also gets the encoder's magnitude image
    (B, h, w) as one more input channel, a path around the backbone."""

    def __init__(self, d_model, out_shape, patch, chans, num_pools, feat=8, image_skip=False):
        super().__init__()
        h, w = out_shape
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the decoder patch {patch}")
        self.grid, self.patch, self.feat, self.image_skip = (h // patch, w // patch), patch, feat, image_skip
        self.register_buffer("token_mean", torch.zeros(self.grid[0] * self.grid[1], d_model))
        self.register_buffer("token_std", torch.ones(self.grid[0] * self.grid[1], d_model))
        self.norm = nn.LayerNorm(d_model)
        self.to_pixels = nn.Linear(d_model, feat * patch * patch)
        self.unet = UNet(feat + int(image_skip), 1, chans, num_pools)

    @property
    def n_queries(self):
        return self.grid[0] * self.grid[1]

    @torch.no_grad()
    def set_token_statistics(self, tokens):  # (N, M, d) training image tokens
        self.token_mean.copy_(tokens.mean(0))
        self.token_std.copy_(tokens.std(0).clamp_min(1e-6 * tokens.std().item()))

    def forward(self, tokens, image=None):  # tokens (B, M, d); image (B, h, w) magnitude, with image_skip
        B, (gh, gw), p = tokens.shape[0], self.grid, self.patch
        x = self.to_pixels(self.norm((tokens - self.token_mean) / self.token_std))  # (B, M, feat*p*p)
        x = (
            x.reshape(B, gh, gw, self.feat, p, p)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(B, self.feat, gh * p, gw * p)
        )
        if self.image_skip:
            x = torch.cat([x, image.unsqueeze(1)], dim=1)  # (B, feat + 1, h, w)
        return F.softplus(self.unet(x).squeeze(1))  # a magnitude image is >= 0
