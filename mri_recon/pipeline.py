"""The Nirvana MRI pipeline (Sec. 3.2.2, Fig. 5): a frozen language backbone with a trainable k-space encoder,
M trainable image queries and an image decoder. The sequence fed to the backbone is
[k-space tokens][prompt tokens][M image-query embeddings][report tokens].

Every call into the language model (llm.embed, llm.backbone, llm.lm_head, llm.setup_caches, llm.clear_caches)
is in `NirvanaMRI` below, so a change of the model's interface is adapted here and nowhere else."""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from mri_recon.fourier import center_crop
from mri_recon.models import ImageDecoder, KspaceEncoder

# Instruction prompts (Sec. 3.2.2 quotes the first one); a training batch uses one of them.
PROMPTS = [
    "According to the k-space signals, are there any pathological features?",
    "Describe the lesions in this slice.",
    "Report the findings of this MRI slice.",
    "Are there lesions? Give count, place, size, shape and contrast.",
]


class NirvanaMRI(nn.Module):
    """Frozen language backbone + k-space encoder + M image queries + image decoder (Sec. 3.2.2, Fig. 5)."""

    def __init__(
        self, llm, encoder, decoder, data_consistency=False, queries_see_kspace=False, backbone_autocast=False
    ):
        super().__init__()
        # backbone_autocast (this code's option, off by default): the frozen backbone runs under bfloat16
        # autocast, as train.py trains it, so its kernels take their bf16 paths; the encoder, queries and decoder
        # stay float32, and the backbone's outputs come back as float32. Greedy report decoding stays float32.
        self.backbone_autocast = backbone_autocast
        # after the decoder, the sampled k-space lines replaced by the measured ones (not in the paper); stage 2
        # trains the decoder through it
        self.data_consistency = data_consistency
        self.llm = llm
        for p in self.llm.parameters():
            p.requires_grad_(False)  # frozen; gradients still flow through it
        self.encoder, self.decoder = encoder, decoder
        d_model = llm.lm_head.in_features
        # the image queries sit before the report tokens, so stage 1 trains them with the encoder and stage 2
        # (which must not change the reports) leaves them alone
        self.image_queries = nn.Parameter(0.02 * torch.randn(decoder.n_queries, d_model))
        # queries_see_kspace (not in the paper): each query also gets a projection of the mean k-space token, so
        # what the encoder found sits right before the report instead of reaching it only through the frozen
        # backbone from the first positions. The projection starts at zero: the paper's queries at init.
        self.kspace_to_queries = None
        if queries_see_kspace:
            self.kspace_to_queries = nn.Linear(d_model, d_model)
            nn.init.zeros_(self.kspace_to_queries.weight)
            nn.init.zeros_(self.kspace_to_queries.bias)

    @staticmethod
    def embedding_rms(llm):
        """The RMS of the backbone's token embeddings: the size of what it reads at every position."""
        return llm.token_embedding.weight.detach().float().pow(2).mean().sqrt().item()

    def stage0_parameters(self):
        """Stage 0 (reconstruction pre-training of the encoder): its VarNet cascades and sensitivity model."""
        return list(self.encoder.varnet.parameters())

    def stage1_parameters(self, cascades=True, backbone=False):
        """Stage 1: the encoder and the image queries; cascades=False leaves out the encoder's VarNet cascades
        and sensitivity model (as stage 0 trained them); backbone=True adds the backbone's weights (mri.py
        --stage1-backbone train, a diagnostic; they take gradients only inside backbone_trainable)."""
        queries = [self.image_queries]
        if self.kspace_to_queries is not None:
            queries += list(self.kspace_to_queries.parameters())
        return self.encoder_parameters(cascades) + queries + (list(self.llm.parameters()) if backbone else [])

    def encoder_parameters(self, cascades=True):
        """The encoder's parameters; cascades=False leaves out its VarNet cascades and sensitivity model."""
        return list(self.encoder.parameters() if cascades else self.encoder.non_cascade_parameters())

    @contextlib.contextmanager
    def backbone_trainable(self, trainable=True):
        """Inside: the backbone's weights take gradients when trainable; frozen again on the way out."""
        for p in self.llm.parameters():
            p.requires_grad_(trainable)
        try:
            yield
        finally:
            for p in self.llm.parameters():
                p.requires_grad_(False)

    def prefix(self, kspace, mask, prompt_ids):
        """[k-space tokens][prompt tokens][image queries] -> embeddings (B, N+Lp+M, d), the encoder's magnitude
        image (B, h, w) and the k-space scale (B,)."""
        ks_tokens, image, scale = self.encoder(kspace, mask)
        return self.prefix_of_tokens(ks_tokens, prompt_ids), image.abs(), scale

    def prefix_of_tokens(self, ks_tokens, prompt_ids):
        """[ks_tokens (B, N, d)][prompt tokens][image queries] -> embeddings (B, N+Lp+M, d)."""
        B = ks_tokens.shape[0]
        prompt = self.llm.embed(prompt_ids[None]).expand(B, -1, -1)
        queries = self.image_queries[None].expand(B, -1, -1)  # (B, M, d)
        if self.kspace_to_queries is not None:
            queries = queries + self.kspace_to_queries(ks_tokens.mean(1))[:, None]
        return torch.cat([ks_tokens, prompt, queries], dim=1)

    def backbone(self, h, trace=None):
        """The frozen backbone on embeddings h (B, T, d) -> final hidden states (B, T, d) in h's dtype; under
        bfloat16 autocast with backbone_autocast."""
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=self.backbone_autocast):
            return self.llm.backbone(h, trace=trace).to(h.dtype)

    def report_loss(self, kspace, mask, prompt_ids, report_targets, eos_id):
        """Stage 1: cross-entropy of the report tokens only. report_targets (B, L) ids + eos, -1 = padding."""
        logits = self.report_logits(self.prefix(kspace, mask, prompt_ids)[0], report_targets, eos_id)
        return F.cross_entropy(logits.flatten(0, 1), report_targets.flatten(), ignore_index=-1)

    def report_logits(self, prefix, report_targets, eos_id):
        """The backbone's logits (B, L, vocab) for the report tokens after prefix (B, P, d), teacher-forced:
        position t predicts report token t."""
        report_in = report_targets[:, :-1].masked_fill(report_targets[:, :-1] < 0, eos_id)
        h = self.backbone(torch.cat([prefix, self.llm.embed(report_in)], dim=1))
        return self.llm.lm_head(h[:, prefix.shape[1] - 1 :])

    def image_tokens(self, kspace, mask, prompt_ids, trace=None):
        """The backbone's final hidden states at the M image-query positions (B, M, d), the encoder's magnitude
        image (B, h, w) (the decoder uses it only with image_skip) and the k-space scale (B,)."""
        prefix, image, scale = self.prefix(kspace, mask, prompt_ids)
        h = self.backbone(prefix, trace=trace)
        return h[:, -self.decoder.n_queries :], image, scale

    def reconstruct_from_tokens(self, tokens, image, scale, measured=None):
        """The decoder's image (B, h, w) from image tokens; with data_consistency and measured, the slices'
        encoder.data_consistency_inputs, after the data-consistency step."""
        magnitude = self.decoder(tokens, image)  # in units of the k-space scale
        if self.data_consistency and measured is not None:
            magnitude = self.encoder.data_consistency(magnitude, *measured)
        return magnitude * scale.reshape(-1, 1, 1)

    def reconstruct_skip_only(self, kspace, mask):
        """With image_skip: the decoder's image from the encoder's image alone, every image token at the
        training mean (decoder.token_mean; the backbone is not run): what the skip gives without the backbone."""
        _, image, scale = self.encoder(kspace, mask)
        tokens = self.decoder.token_mean.expand(kspace.shape[0], -1, -1)
        return self.reconstruct_from_tokens(tokens, image.abs(), scale)

    def forward(self, kspace, mask, prompt_ids):  # -> image (B, h, w)
        measured = self.encoder.data_consistency_inputs(kspace, mask) if self.data_consistency else None
        return self.reconstruct_from_tokens(*self.image_tokens(kspace, mask, prompt_ids), measured)

    def decoder_alone(self, kspace, mask, prompt_ids):
        """With data_consistency: the decoder's image before that step."""
        return self.reconstruct_from_tokens(*self.image_tokens(kspace, mask, prompt_ids))

    def encoder_image_with_data_consistency(self, kspace, mask):
        """With data_consistency: the step applied to the encoder's own magnitude image, no backbone: what the
        measured lines give without the backbone's image tokens."""
        k0, scale, sens, image = self.encoder.coil_estimate(kspace, mask)  # the cascades once, no ViT
        magnitude = center_crop(
            image, self.encoder.out_shape
        ).abs()  # the encoder's image, as encoder() gives it
        return self.encoder.data_consistency(magnitude, k0, mask, sens, image) * scale.reshape(-1, 1, 1)

    @torch.no_grad()
    def generate_reports(self, kspace, mask, prompt_ids, eos_id, max_len):
        """Greedy decoding of the report after the image queries -> list of token-id lists."""
        prefix, _, _ = self.prefix(kspace, mask, prompt_ids)
        B = prefix.shape[0]
        tokens, done = [], torch.zeros(B, dtype=torch.bool, device=prefix.device)
        self.llm.setup_caches(B, prefix.shape[1] + max_len)  # prefill, then O(1) per token
        try:
            h = self.llm.backbone(prefix, input_pos=0)
            for step in range(max_len):
                nxt = self.llm.lm_head(h[:, -1]).argmax(-1).masked_fill(done, eos_id)  # (B,)
                tokens.append(nxt)
                done = done | (nxt == eos_id)
                if done.all():
                    break
                h = self.llm.backbone(self.llm.embed(nxt[:, None]), input_pos=prefix.shape[1] + step)
        finally:
            self.llm.clear_caches()
        rows = torch.stack(tokens, 1).tolist()
        return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def build_nirvana_mri(llm, out_shape, args):
    """The pipeline around a frozen backbone, with the encoder and decoder sizes of the options."""
    d_model = llm.lm_head.in_features
    encoder = KspaceEncoder(
        d_model,
        out_shape,
        args.enc_cascades,
        args.chans,
        args.sens_chans,
        args.vit_dim,
        args.vit_depth,
        heads_for(args.vit_dim),
        args.vit_stride,
        NirvanaMRI.embedding_rms(llm) if args.kspace_token_norm == "batch" else None,
    )
    decoder = ImageDecoder(
        d_model, out_shape, args.patch, args.dec_chans, args.pools, image_skip=args.image_skip
    )
    return NirvanaMRI(
        llm, encoder, decoder, args.data_consistency, args.queries_see_kspace, args.backbone_autocast
    ).to(args.device)


def heads_for(dim):
    """Attention heads of the encoder's T2T-ViT of width dim: one per 32 features, at least one."""
    return max(1, dim // 32)


def count_trainable(*modules_or_params):
    """Parameters of the given modules and tensors, each counted once."""
    seen, total = set(), 0
    for m in modules_or_params:
        for p in m.parameters() if isinstance(m, nn.Module) else [m]:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def encode_reports(tokenizer, reports, device):
    """Reports -> (B, L) token ids with eos appended, padded with -1."""
    ids = [tokenizer.encode(r) + [tokenizer.eos_id] for r in reports]
    out = torch.full((len(ids), max(map(len, ids))), -1, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
    return out.to(device)


def mri_sequence_length(model, out_shape, tokenizer, reports):
    """Longest backbone sequence: k-space tokens + the longest prompt + image queries + report tokens +
    eos."""
    n_kspace = model.encoder.vit.n_tokens(*out_shape)
    prompt = max(len(tokenizer.encode(p)) for p in PROMPTS)
    return n_kspace + prompt + model.decoder.n_queries + max(len(tokenizer.encode(r)) for r in reports) + 1
