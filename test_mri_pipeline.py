"""Tests of the MRI networks and the pipeline around the frozen backbone (CPU, tiny sizes): shapes, both
post-training stages and stage 0, the image skip, the diagnostics, the gate statistics between slices, the frozen
backbone whose Trigger still adapts, train.py checkpoints of other variants (the transformer of Fig. 4) as
backbones, cached report generation, and model selection on the validation split."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mri
import train
from mri_recon.backbones import load_backbones, state_fingerprint, unchanged, window_note
from mri_recon.batches import masked
from mri_recon.diagnostics import (
    decoder_ssim,
    diagnose,
    findings,
    findings_probe,
    linear_probe,
    partner_slices,
    report_cross_entropy,
    ridge_fit_predict,
    slice_blind_cross_entropy,
    slice_features,
    slice_specific_share,
)
from mri_recon.evaluation import gate_statistics, generate_test_reports
from mri_recon.experiment import Data
from mri_recon.fastmri_files import load_volumes
from mri_recon.fit import fit
from mri_recon.fourier import center_crop, ifft2c, rss
from mri_recon.masks import make_mask, volume_mask
from mri_recon.metrics import ssim
from mri_recon.models import (
    E2EVarNet,
    ImageDecoder,
    KspaceEncoder,
    SliceStandardise,
    T2TViT,
    UNetBaseline,
    centre_lines,
    kspace_layer_norm,
    sens_expand,
    sens_reduce,
)
from mri_recon.phantoms import generate_dataset, parse_report
from mri_recon.pipeline import PROMPTS, build_nirvana_mri, encode_reports, mri_sequence_length
from mri_recon.results import diagnostics_table
from mri_recon.training import (
    cache_image_tokens,
    decoder_val_loss,
    train_findings,
    train_stage0,
    train_stage1,
    train_stage2,
)
from nirvana import Nirvana, NirvanaConfig
from prepare import prepare
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """3 synthetic volumes x 4 slices, 16x16, 2 coils, shared by the tests (which only read them)."""
    paths = generate_dataset(str(tmp_path_factory.mktemp("mri_data")), 3, 4, 16, 2, seed=0)
    return load_volumes(paths, "cpu")


def tiny_args(**overrides):
    args = mri.parse_args(
        "--steps 25 --batch-size 4 --size 16 --chans 4 --sens-chans 2 --pools 1 --enc-cascades 1 "
        "--vit-dim 32 --vit-depth 1 --patch 4 --dec-chans 8 --lr 3e-3 --device cpu".split()
    )
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def tiny_model(variant="nirvana", init_std=0.02, **overrides):
    """A tiny random backbone. init_std 0.2 gives it an output layer that can be confident, as a pretrained
    one is (at 0.02 its logits are bounded near uniform and stage 1 can hardly move the loss)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("bytes")
    llm = Nirvana(
        NirvanaConfig.from_preset(
            f"{variant}-tiny", vocab_size=tokenizer.vocab_size, n_layers=3, window=16, init_std=init_std
        )
    ).eval()
    return build_nirvana_mri(llm, (16, 16), tiny_args(**overrides)), tokenizer


def test_baselines_and_encoder_shapes():
    kspace = torch.randn(2, 3, 32, 16, dtype=torch.complex64)
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)])
    )
    kspace = kspace * mask[:, None, None, :]
    assert E2EVarNet(2, 4, 2, 1)(kspace, mask, (16, 16)).shape == (2, 16, 16)
    assert UNetBaseline(4, 2)(kspace, mask, (16, 16)).shape == (2, 16, 16)
    tokens, image, scale = KspaceEncoder(48, (16, 16), 1, 4, 2, 32, 1, 1)(kspace, mask)
    assert tokens.shape == (2, 1, 48) and image.shape == (2, 16, 16) and scale.shape == (2,)
    assert ImageDecoder(48, (16, 16), 4, 8, 1)(torch.randn(2, 16, 48)).shape == (2, 16, 16)
    with pytest.raises(ValueError, match="patch"):
        ImageDecoder(48, (18, 16), 4, 8, 1)


@pytest.mark.parametrize("stride, tokens", [(4, 16), (8, 4), (16, 1)])
def test_t2t_vit_stride_sets_the_number_of_kspace_tokens(stride, tokens):
    vit = T2TViT(3, 32, 1, 1, stride=stride)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, tokens, 32) and vit.n_tokens(16, 16) == tokens
    assert len(vit.splits) == {4: 1, 8: 2, 16: 3}[stride] == len(vit.t2t_blocks) + 1


def test_t2t_vit_refuses_another_stride():
    with pytest.raises(ValueError, match="stride 32 is not one of"):
        T2TViT(3, 32, 1, 1, stride=32)


def test_centre_lines_are_the_contiguous_run_around_the_centre():
    mask = torch.tensor([[1, 0, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(centre_lines(mask), expected)


def test_nirvana_reconstruction_scales_with_the_kspace():
    """The k-space LayerNorm makes the tokens scale-free, and the decoder output is multiplied back: a volume
    recorded 10x stronger reconstructs 10x brighter (fastMRI volumes differ in signal level by orders)."""
    model, tokenizer = tiny_model()
    model.eval()
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)])
    )
    kspace = kspace * mask[:, None, None, :]
    prompt = torch.tensor(tokenizer.encode("hi"))
    with torch.no_grad():
        base, scaled = model(kspace, mask, prompt), model(10 * kspace, mask, prompt)
    assert torch.allclose(scaled, 10 * base, rtol=1e-3, atol=1e-6)


def test_both_stages_reduce_their_loss_and_the_backbone_stays_frozen(volumes):
    model, tokenizer = tiny_model(init_std=0.2)
    args, rng = tiny_args(stage1_steps=30), np.random.default_rng(0)  # stage 2 keeps --steps, 25
    fingerprint = state_fingerprint(model.llm)
    decoder_before = state_fingerprint(model.decoder)
    stage1 = train_stage1("t", model, volumes, tokenizer, args, rng)
    assert unchanged(model.decoder, decoder_before)  # stage 1 trains the encoder only
    encoder_before = state_fingerprint(model.encoder)
    queries_before = model.image_queries.detach().clone()
    stage2 = train_stage2("t", model, volumes, tokenizer, args, rng)
    assert (len(stage1.losses), len(stage2.losses)) == (30, 25)
    assert np.mean(stage1.losses[-5:]) < np.mean(stage1.losses[:5]) - 0.3
    assert np.mean(stage2.losses[-5:]) < np.mean(stage2.losses[:5]) - 0.02
    assert unchanged(model.encoder, encoder_before) and torch.equal(model.image_queries, queries_before)
    assert unchanged(model.llm, fingerprint)  # bit-equal after both stages
    assert all(not p.requires_grad for p in model.llm.parameters())


def test_queries_see_kspace_start_as_the_papers_and_learn_to_follow_the_slice():
    """--queries-see-kspace: at init every slice gets the same image queries (the projection of the mean
    k-space token is zero), the paper's; stage 1 trains the projection (and stage 2 freezes it), after which
    the queries differ between slices. Without the option the queries never depend on the slice."""
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)])
    )
    kspace = kspace * mask[:, None, None, :]
    reports = ["lesions: 0.", "lesions: 1. left frontal: small round dark."]
    for option in (False, True):
        model, tokenizer = tiny_model(queries_see_kspace=option)
        prompt = torch.tensor(tokenizer.encode(PROMPTS[0]))
        M = model.decoder.n_queries
        queries = lambda: model.prefix(kspace, mask, prompt)[0][:, -M:].detach()
        assert torch.equal(queries()[0], queries()[1])  # the paper's queries at init
        parameters = model.stage1_parameters(cascades=False)
        assert (model.kspace_to_queries is not None) == option
        if option:  # stage 1 trains the projection
            assert all(any(p is q for q in parameters) for p in model.kspace_to_queries.parameters())
        optimizer = torch.optim.Adam(parameters, lr=1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            targets = encode_reports(tokenizer, reports, "cpu")
            model.report_loss(kspace, mask, prompt, targets, tokenizer.eos_id).backward()
            optimizer.step()
        assert torch.equal(queries()[0], queries()[1]) != option


def test_gradients_flow_through_the_frozen_backbone_and_the_trigger_adapts():
    model, tokenizer = tiny_model()
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)])
    )
    prompt = torch.tensor(tokenizer.encode(PROMPTS[0]))
    reports = encode_reports(tokenizer, ["lesions: 0.", "lesions: 1. left frontal: small round dark."], "cpu")
    model.report_loss(kspace * mask[:, None, None, :], mask, prompt, reports, tokenizer.eos_id).backward()
    assert model.encoder.to_model.weight.grad.abs().sum() > 0  # reached the encoder through the LLM
    assert all(p.grad is None for p in model.llm.parameters())
    traces = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        k = torch.randn(1, 2, 16, 16, dtype=torch.complex64) * mask[:1, None, None, :]
        trace = {}
        with torch.no_grad():
            model.image_tokens(k, mask[:1], prompt, trace=trace)
        traces.append(torch.stack(trace["p"]))
    assert traces[0].shape[-1] == model.llm.config.bank_size
    assert not torch.allclose(traces[0], traces[1])  # p depends on the k-space input
    assert not torch.allclose(traces[0], torch.ones_like(traces[0]))  # and moved from p^0 = ones


def test_fit_restores_the_parameters_of_the_best_validation_check():
    """Model selection: four checks score 3, 1, 2, 4; fit must end with the parameters seen at the second."""
    w = torch.nn.Parameter(torch.zeros(3))
    scores, seen = [3.0, 1.0, 2.0, 4.0], []

    def validate():
        seen.append(w.detach().clone())
        return scores[len(seen) - 1]

    batches = iter(lambda: None, 1)  # endless; the loss needs no batch
    result = fit(
        "w", [w], lambda _: (w - 5).pow(2).sum(), batches, steps=20, lr=0.1, validate=validate, checks=4
    )
    assert [s for s, _ in result.checks] == [5, 10, 15, 20] and result.best_step == 10
    assert torch.equal(w.detach(), seen[1]) and not torch.equal(seen[1], seen[3])
    assert len(result.losses) == 20


@pytest.fixture(scope="module")
def pretrained_backbones(tmp_path_factory):
    """train.py checkpoints (2 steps on a byte-level corpus) of the two variants the tests load, sized with
    --set."""
    root = tmp_path_factory.mktemp("backbones")
    texts = []
    for i in range(5):
        texts.append(root / f"doc{i}.txt")
        texts[-1].write_text(
            f"lesions: {i}. left frontal: small round bright. the k-space holds the image. " * 20
        )
    prepare([str(t) for t in texts], str(root / "data"), "bytes", val_fraction=0.2)
    paths, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest.py does for each test (a module fixture runs before it)
    try:
        for variant in ("nirvana-notrigger", "transformer"):
            out = root / variant
            options = (
                f"--preset {variant}-tiny --set n_layers=3 --set window=256 --max-tokens 512 --micro-batch 2 "
                "--seq-len 64 --global-batch-tokens 256 --warmup-tokens 256 --eval-every 2 --eval-tokens 128 "
                "--device cpu"
            )
            train.main([*options.split(), "--data", str(root / "data"), "--out", str(out)])
            paths[variant] = str(out / "ckpt.pt")
    finally:
        torch.set_num_threads(threads)
    return paths


def test_backbones_sized_with_train_py_set_keep_their_config(pretrained_backbones):
    config = Nirvana.from_checkpoint(pretrained_backbones["transformer"]).config
    assert (config.variant, config.n_layers, config.window) == ("transformer", 3, 256)


def test_random_backbones_attend_to_the_whole_mri_sequence():
    """The tiny random-init backbones (no --backbone) have their whole context as the window, so the report
    tokens see every k-space token; the preset's own window (32) is shorter than the MRI sequence."""
    [(_, llm, _, _)] = load_backbones(tiny_args(backbone=[], variants=["nirvana"]))
    assert llm.config.window == llm.config.context_length == 256
    assert "fits in the window" in window_note(llm, 230)


@pytest.mark.parametrize("variant", ["transformer", "nirvana-notrigger"])
def test_any_variant_checkpoint_is_a_frozen_backbone(volumes, pretrained_backbones, variant):
    """A transformer (no Trigger, no gates) or nirvana-notrigger (gates, no p) checkpoint runs both stages,
    stays bit-equal, generates reports, and has the gate statistics it can have."""
    args = tiny_args(backbone=[pretrained_backbones[variant]], steps=4)
    [(name, llm, tokenizer, how)] = load_backbones(args)
    assert name == f"LLM[{variant}]" and "pretrained 2 steps" in how and "validation loss" in how
    model = build_nirvana_mri(llm, (16, 16), args)
    seq_len = mri_sequence_length(model, (16, 16), tokenizer, [r for v in volumes for r in v.reports])
    assert (
        seq_len
        == 1
        + max(len(tokenizer.encode(p)) for p in PROMPTS)
        + 16
        + max(len(tokenizer.encode(r)) for v in volumes for r in v.reports)
        + 1
    )
    assert "fits in the window" in window_note(llm, seq_len)
    assert "WARNING" in window_note(llm, 300)
    fingerprint = state_fingerprint(llm)
    rng = np.random.default_rng(0)
    train_stage1(name, model, volumes[:2], tokenizer, args, rng, volumes[2:])
    fit2 = train_stage2(name, model, volumes[:2], tokenizer, args, rng, volumes[2:])
    assert unchanged(llm, fingerprint) and len(fit2.checks) == args.val_checks
    prompt = torch.tensor(tokenizer.encode(PROMPTS[0]))
    generated, truth = generate_test_reports(model, volumes[2:], tokenizer, 4, args, max_len=8)
    assert len(generated) == len(truth) == 4
    stats = gate_statistics(model, volumes, prompt, 4, args)
    if variant == "transformer":
        assert stats is None
    else:
        assert len(stats["gate_queries"]) == 1 and "p_shift_queries" not in stats


def test_gate_statistics_see_the_trigger_move_p(volumes):
    model, tokenizer = tiny_model()
    stats = gate_statistics(model, volumes, torch.tensor(tokenizer.encode("hi")), 8, tiny_args())
    assert stats["slices"] == 12 and len(stats["p_shift_queries"]) == 1  # every slice, not the middle ones
    assert (
        0 < stats["gate_kspace"][0] < 1
        and stats["p_shift_kspace"][0] > 0
        and stats["p_slice_std_queries"][0] > 0
    )


def test_cached_report_generation_equals_greedy_full_recompute():
    model, tokenizer = tiny_model(init_std=0.2)
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.ones(2, 16, dtype=torch.bool)
    prompt = torch.tensor(tokenizer.encode("hi"))
    ids = model.generate_reports(kspace, mask, prompt, tokenizer.eos_id, max_len=6)
    assert len(ids) == 2 and all(len(i) <= 6 and tokenizer.eos_id not in i for i in ids)
    with torch.no_grad():
        seq, _, _ = model.prefix(kspace, mask, prompt)
        steps = []
        for _ in range(6):  # greedy, recomputing the whole sequence
            steps.append(model.llm.lm_head(model.llm.backbone(seq)[:, -1]).argmax(-1))
            seq = torch.cat([seq, model.llm.embed(steps[-1][:, None])], dim=1)
    for got, want in zip(ids, torch.stack(steps, 1).tolist()):
        want = want[: want.index(tokenizer.eos_id)] if tokenizer.eos_id in want else want
        assert got == want


def test_stage0_reduces_the_encoder_reconstruction_loss_and_trains_only_its_cascades(volumes):
    model, tokenizer = tiny_model()
    args, rng = tiny_args(), np.random.default_rng(0)
    assert args.encoder_pretrain_steps == args.steps  # on by default, as many steps as every other phase
    rest = [model.encoder.vit, model.encoder.to_model, model.decoder, model.llm]
    before = [state_fingerprint(m) for m in rest]
    queries, cascades = model.image_queries.detach().clone(), state_fingerprint(model.encoder.varnet)
    result = train_stage0("t", model, volumes, args, rng)
    assert len(result.losses) == args.steps
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.05  # -SSIM of the encoder's image
    assert not unchanged(model.encoder.varnet, cascades)
    assert all(unchanged(m, f) for m, f in zip(rest, before)) and torch.equal(model.image_queries, queries)


def test_image_skip_is_off_by_default_and_feeds_the_encoder_image_when_on():
    tokens, images = torch.randn(2, 16, 64), torch.rand(2, 2, 16, 16)
    plain, _ = tiny_model()
    assert not tiny_args().image_skip and not plain.decoder.image_skip
    with torch.no_grad():
        outputs = [plain.decoder(tokens, image) for image in images]
    assert torch.equal(outputs[0], outputs[1])  # the encoder's image does not reach the paper's decoder
    skip, _ = tiny_model(image_skip=True)
    assert skip.decoder.unet.downs[0][0].in_channels == plain.decoder.unet.downs[0][0].in_channels + 1
    with torch.no_grad():
        outputs = [skip.decoder(tokens, image) for image in images]
        assert not torch.allclose(outputs[0], outputs[1])
        # skip only: every token at the training mean, whatever the k-space; the image comes from the encoder
        kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
        mask = torch.ones(2, 16, dtype=torch.bool)
        _, image, scale = skip.encoder(kspace, mask)
        mean = skip.decoder.token_mean.expand(2, -1, -1)
        expected = skip.decoder(mean, image.abs()) * scale.reshape(-1, 1, 1)
        assert torch.allclose(skip.reconstruct_skip_only(kspace, mask), expected)


def test_partner_slices_pair_each_slice_with_another_one():
    assert partner_slices([3, 3]).tolist() == [3, 4, 5, 0, 1, 2]  # same slice index, next volume
    assert partner_slices([2, 3]).tolist() == [2, 3, 0, 1, 1]  # the next volume's last when it is shorter
    assert partner_slices([4]).tolist() == [2, 3, 0, 1]  # one volume: half a volume away
    assert partner_slices([1]) is None


def test_diagnostics_score_the_decoder_on_the_right_token_pairs(volumes):
    model, tokenizer = tiny_model()
    args = tiny_args()
    prompt = torch.tensor(tokenizer.encode(PROMPTS[0]))
    data = Data(volumes[:1], volumes[1:2], volumes[1:], "", "", (16, 16))
    with torch.no_grad():
        test = slice_features(model, data.test, prompt, 4, args)
        model.decoder.set_token_statistics(test.image_tokens)
        result = diagnose(model, data, tokenizer, prompt, 4, args)
        by_hand = lambda source: np.mean(
            [
                ssim(
                    model.reconstruct_from_tokens(
                        test.image_tokens[j][None], test.encoder_image[[i]], test.scale[[i]]
                    ),
                    test.target[[i]],
                    test.maxval[[i]],
                ).item()
                for i, j in enumerate(source)
            ]
        )
        assert result["ssim_own_tokens"] == pytest.approx(by_hand(range(8)), abs=1e-6)
        # slice s of the first test volume gets the tokens of slice s of the second, and back
        assert result["ssim_other_slice_tokens"] == pytest.approx(by_hand([4, 5, 6, 7, 0, 1, 2, 3]), abs=1e-6)
        assert result["ssim_other_slice_tokens"] != pytest.approx(result["ssim_own_tokens"], abs=1e-5)
        mean_tokens = model.decoder.token_mean.expand_as(test.image_tokens)
        assert result["ssim_mean_token"] == pytest.approx(decoder_ssim(model, mean_tokens, test, 3), abs=1e-6)
    assert result["slices"] == {"train": 4, "val": 4, "test": 8}
    assert set(result["probe_image_tokens"]) == {"r2", "ssim", "strength"}
    assert set(result["probe_truth_image_tokens"]) == {"r2", "ssim", "strength"}
    # the report cross-entropy, own k-space vs the other slice's (report_cross_entropy below checks the pairs)
    ce_keys = (
        "report_ce_own",
        "report_ce_other_slice",
        "report_ce_own_other_report_only",
        "report_ce_other_report_only",
    )
    assert all(isinstance(result[k], float) and np.isfinite(result[k]) for k in ce_keys)
    assert result["report_ce_slices"] == {"all": 8, "other_report": 4}
    table = "\n".join(diagnostics_table({("tiny", 4): result}))
    row = " | ".join(f"{result[k]:.4f}" for k in ce_keys[:2])
    assert "Does the report depend on the slice?" in table and f"| tiny | 4x | 8 | {row} | 4 |" in table
    blind = slice_blind_cross_entropy(volumes[0].reports, tokenizer)  # the training volume's reports
    assert result["report_ce_slice_blind"] == pytest.approx(blind) and f"| {blind:.4f} |" in table
    # the findings probes: one per feature, each finding with two or more training values
    probes = result["probe_findings"]
    assert set(probes) == {"kspace_tokens", "image_tokens", "zero_filled", "target"}
    count = probes["kspace_tokens"]["count"]
    row = f"| tiny | 4x | count | {count['classes']} | {count['majority']:.3f} | {count['accuracy']:.3f} |"
    assert "Can the findings be read from the tokens?" in table and row in table
    share = result["slice_specific_share"]["kspace_tokens"]
    assert 0 < share < 1 and f"tiny 4x: k-space tokens {share:.2e}" in table


def test_slice_specific_share_is_the_part_that_differs_between_slices():
    same = torch.ones(5, 3, 2)
    assert slice_specific_share(same) == 0
    # tokens 10 + e_i: mean square 100 + 2*10*mean(e) + mean(e^2); what differs is e minus its mean
    e = torch.tensor([[1.0], [-1.0]])
    assert slice_specific_share(10 + e) == pytest.approx(1 / 101)


def test_slice_blind_cross_entropy_is_the_reports_entropy_per_token():
    """Reports a, bb, a, ccc with one token per letter (+ eos): frequencies 1/2, 1/4, 1/2, 1/4, so the best
    slice-blind model pays 2 log 2 + 2 log 4 = 6 log 2 nats over 2 + 3 + 2 + 4 = 11 tokens; reports that are
    all the same cost nothing."""
    letters = SimpleNamespace(encode=lambda report: list(report))
    value = slice_blind_cross_entropy(["a", "bb", "a", "ccc"], letters)
    assert value == pytest.approx(6 * math.log(2) / 11)
    assert slice_blind_cross_entropy(["a", "a"], letters) == 0
    assert slice_blind_cross_entropy([], letters) is None


@pytest.mark.parametrize("pad_second_volume", [False, True])
def test_report_cross_entropy_gives_each_slice_its_partners_kspace_and_its_own_report(
    volumes, pad_second_volume
):
    """By hand: batches of 4 slices (batch size 1), each with its reports after its own k-space and after its
    partner's (the same slice of the other volume). The second volume's k-space zero-padded to another height
    (fastMRI volumes differ in size) keeps the same pairs, in batches of one own and one partner shape. Own and
    other slice's differ, and are equal once the encoder's tokens no longer depend on the k-space."""
    model, tokenizer = tiny_model(init_std=0.2)  # a backbone whose logits can follow the k-space tokens
    args = tiny_args(batch_size=1)
    prompt = torch.tensor(tokenizer.encode("hi"))  # short: the k-space token stays in the tiny window
    test = volumes[1:]
    if pad_second_volume:
        k = test[1].kspace
        rows = torch.zeros(*k.shape[:2], 2, k.shape[-1], dtype=k.dtype)
        test = [test[0], dataclasses.replace(test[1], kspace=torch.cat([rows, k, rows], dim=2))]
    kspace, masks = zip(
        *[masked(v, 0, 4, volume_mask(v.name, v.kspace.shape[-1], 4, args.mask_type)) for v in test]
    )
    reports = [r for v in test for r in v.reports]
    by_hand = lambda slices, sources: np.mean(
        [
            model.report_loss(
                torch.stack([kspace[j // 4][j % 4] for j in source]),
                torch.stack([masks[j // 4][j % 4] for j in source]),
                prompt,
                encode_reports(tokenizer, [reports[i] for i in batch], "cpu"),
                tokenizer.eos_id,
            ).item()
            for batch, source in zip(slices, sources)
        ]
    )
    with torch.no_grad():
        result = report_cross_entropy(model, test, tokenizer, prompt, 4, args)
        partner = [4, 5, 6, 7, 0, 1, 2, 3]
        own_batches, partner_batches = [[0, 1, 2, 3], [4, 5, 6, 7]], [[4, 5, 6, 7], [0, 1, 2, 3]]
        assert result["report_ce_own"] == pytest.approx(by_hand(own_batches, own_batches), abs=1e-6)
        assert result["report_ce_other_slice"] == pytest.approx(
            by_hand(own_batches, partner_batches), abs=1e-6
        )
        # slices 0 and 1 of each volume have a partner with another report (slices 2 and 3: 'lesions: 0.' both)
        # one batch unless the volumes differ in k-space shape: a batch holds one own and one partner shape
        other_report = [[0, 1], [4, 5]] if pad_second_volume else [[0, 1, 4, 5]]
        assert result["report_ce_slices"] == {"all": 8, "other_report": 4}
        assert result["report_ce_own_other_report_only"] == pytest.approx(
            by_hand(other_report, other_report), abs=1e-6
        )
        assert result["report_ce_other_report_only"] == pytest.approx(
            by_hand(other_report, [[partner[i] for i in b] for b in other_report]), abs=1e-6
        )
        # well apart, beside the by-hand tolerance: the partner's k-space changed the cross-entropy
        assert abs(result["report_ce_own"] - result["report_ce_other_slice"]) > 2e-5
        assert abs(result["report_ce_own_other_report_only"] - result["report_ce_other_report_only"]) > 2e-5
        model.encoder.to_model.weight.zero_()  # the k-space tokens: the same bias for every slice
        blind = report_cross_entropy(model, test, tokenizer, prompt, 4, args)
        assert blind["report_ce_own"] == pytest.approx(blind["report_ce_other_slice"], abs=1e-6)
        assert blind["report_ce_own_other_report_only"] == pytest.approx(
            blind["report_ce_other_report_only"], abs=1e-6
        )


def test_report_cross_entropy_is_left_out_without_reports(volumes):
    """Test volumes without reports: None values, shown as '-'; a single slice has no partner either."""
    model, tokenizer = tiny_model()
    args, prompt = tiny_args(), torch.tensor(tokenizer.encode(PROMPTS[0]))
    no_reports = [dataclasses.replace(v, reports=None) for v in volumes[1:]]
    with torch.no_grad():
        result = diagnose(
            model, Data(volumes[:1], volumes[:1], no_reports, "", "", (16, 16)), tokenizer, prompt, 4, args
        )
        single = dataclasses.replace(volumes[0], kspace=volumes[0].kspace[:1], reports=volumes[0].reports[:1])
        alone = report_cross_entropy(model, [single], tokenizer, prompt, 4, args)
    for ce in (result, alone):
        assert [k for k in ce if k.startswith("report_ce_") and ce[k] is None] == [
            "report_ce_own",
            "report_ce_other_slice",
            "report_ce_own_other_report_only",
            "report_ce_other_report_only",
        ]
    assert result["report_ce_slices"] == {"all": 0, "other_report": 0} and result["slices"]["test"] == 8
    blind = result["report_ce_slice_blind"]  # from the training volume, which has reports
    assert f"| tiny | 4x | 0 | - | - | 0 | - | - | {blind:.4f} |" in diagnostics_table({("tiny", 4): result})


def test_linear_probe_reads_a_linear_image_and_not_noise():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(60, 20, generator=rng)
    w = torch.randn(20, 64, generator=rng)
    y = x @ w + 3.0  # an "8x8 image" exactly linear in the features
    split = lambda t: (t[:40], t[40:50], t[50:])
    (tx, vx, ex), (ty, vy, ey) = split(x), split(y)
    exact = linear_probe(tx, ty, vx, vy, ex, ey, (8, 8))
    assert exact["r2"] > 0.99 and exact["ssim"] > 0.99 and exact["strength"] <= 1e-2
    noise = torch.randn(60, 64, generator=rng)
    (ny, nvy, ney) = split(noise)
    own_max = linear_probe(tx, ny, vx, nvy, ex, ney, (8, 8))
    assert own_max["r2"] < 0.1
    # a given data range (the decoder's: the volume max) replaces each slice's own max in the SSIM
    data_range = torch.full((10,), 4 * ney.abs().max().item())
    wide = linear_probe(tx, ny, vx, nvy, ex, ney, (8, 8), data_range=data_range)
    pred = ridge_fit_predict(tx.double(), ny.double(), ex.double(), wide["strength"])
    by_hand = ssim(pred.reshape(-1, 8, 8), ney.double().reshape(-1, 8, 8), data_range.double()).mean().item()
    assert wide["ssim"] == pytest.approx(by_hand, abs=1e-9)
    assert abs(wide["ssim"] - own_max["ssim"]) > 0.01


def test_gate_distances_between_slices_equal_the_pairwise_loop(volumes):
    model, tokenizer = tiny_model()
    args = tiny_args()
    prompt = torch.tensor(tokenizer.encode("hi"))
    stats = gate_statistics(model, volumes, prompt, 8, args)
    reports = [r.strip() for v in volumes for r in v.reports]
    counts = [parse_report(r)[0] for r in reports]
    n = len(reports)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    same = sum(reports[i] == reports[j] for i, j in pairs)
    assert stats["pairs"]["report"] == {"same": same, "different": len(pairs) - same}
    # p at the image queries, by a plain loop over the slices and their pairs
    ps = []
    with torch.no_grad():
        for v in volumes:
            mask = volume_mask(v.name, v.kspace.shape[-1], 8, args.mask_type)
            trace = {}
            model.image_tokens(*masked(v, 0, v.kspace.shape[0], mask), prompt, trace=trace)
            ps.append(trace["p"][0][:, -model.decoder.n_queries :])  # layer 0: (S, M, K)
    p = torch.cat(ps)
    for key, label in (("report", reports), ("count", counts)):
        for kind, keep in (("same", lambda a, b: a == b), ("different", lambda a, b: a != b)):
            chosen = [(i, j) for i, j in pairs if keep(label[i], label[j])]
            if not chosen:
                assert stats["distance"]["p queries"][f"{kind} {key}"] is None
                continue
            want = np.mean([(p[i] - p[j]).abs().mean().item() for i, j in chosen])
            got = stats["distance"]["p queries"][f"{kind} {key}"][0]
            assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("cascades", ["freeze", "train"])
def test_stage1_freezes_or_trains_the_encoder_cascades(volumes, cascades):
    model, tokenizer = tiny_model(init_std=0.2)
    args = tiny_args(steps=3, stage1_cascades=cascades)
    before, vit = state_fingerprint(model.encoder.varnet), state_fingerprint(model.encoder.vit)
    train_stage1("t", model, volumes, tokenizer, args, np.random.default_rng(0))
    assert unchanged(model.encoder.varnet, before) == (cascades == "freeze")
    assert not unchanged(model.encoder.vit, vit)


@pytest.mark.parametrize("backbone", ["freeze", "train"])
def test_stage1_trains_the_backbone_only_when_asked_and_freezes_it_again(volumes, backbone):
    """--stage1-backbone train: stage 1 changes the backbone's weights; afterwards they take no gradient again
    (stage 2 must not change them). freeze (the default, the paper's recipe): bit-equal."""
    model, tokenizer = tiny_model(init_std=0.2)
    args = tiny_args(steps=3, stage1_backbone=backbone)
    before = state_fingerprint(model.llm)
    train_stage1("t", model, volumes, tokenizer, args, np.random.default_rng(0))
    assert unchanged(model.llm, before) == (backbone == "freeze")
    assert not any(p.requires_grad for p in model.llm.parameters())
    after = state_fingerprint(model.llm)
    train_stage2("t", model, volumes, tokenizer, args, np.random.default_rng(0))
    assert unchanged(model.llm, after)


def test_findings_stage_trains_the_encoders_token_path_to_name_the_findings(volumes):
    """--encoder-findings-steps: the heads' cross-entropy falls on the training slices (the encoder's tokens come
    to name count and places); the ViT changes, the VarNet cascades (frozen after stage 0) and the backbone do
    not. Reports without findings that vary are a named error."""
    model, _ = tiny_model()
    args = tiny_args(encoder_findings_steps=40, stage1_cascades="freeze")
    varnet, vit, llm = (state_fingerprint(m) for m in (model.encoder.varnet, model.encoder.vit, model.llm))
    result = train_findings("t", model, volumes, args, np.random.default_rng(0))
    assert len(result.losses) == 40
    assert np.mean(result.losses[-5:]) < 0.8 * np.mean(result.losses[:5])
    assert unchanged(model.encoder.varnet, varnet) and unchanged(model.llm, llm)
    assert not unchanged(model.encoder.vit, vit)
    same = [dataclasses.replace(v, reports=["lesions: 0."] * len(v.reports)) for v in volumes]
    with pytest.raises(ValueError, match="state no finding with two or more values"):
        train_findings("t", model, same, args, np.random.default_rng(0))


def test_slice_standardise_uses_the_batch_while_training_and_its_stored_statistics_otherwise():
    """Training with gradients: every token feature has mean 0 over the batch's slices and, pooled over
    positions, std `scale`; the stored statistics follow as an exponential average. Without gradients, or in
    eval mode, the stored ones; calibrate replaces them by a set's own (which then standardises that set)."""
    torch.manual_seed(0)
    norm = SliceStandardise(3, 5, scale=0.5, momentum=0.25)
    x = 7 + 3 * torch.randn(6, 3, 5) * torch.arange(1, 6)  # a large common part, features of unequal spread
    y = norm(x.requires_grad_())
    torch.testing.assert_close(y.mean(0), torch.zeros(3, 5), atol=1e-5, rtol=0)
    pooled = y.pow(2).mean((0, 1)) * 6 / 5
    torch.testing.assert_close(pooled.sqrt(), torch.full((5,), 0.5), atol=1e-5, rtol=0)
    mean, var = SliceStandardise.statistics(x.detach())
    torch.testing.assert_close(norm.mean, 0.25 * mean)
    torch.testing.assert_close(norm.var, 0.75 + 0.25 * var)
    stored = (norm.mean.clone(), norm.var.clone())
    expected = (x.detach() - stored[0]) * torch.rsqrt(stored[1] + norm.eps) * 0.5
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected)  # no gradients: the stored statistics, not updated
    norm.eval()
    torch.testing.assert_close(norm(x).detach(), expected)
    assert torch.equal(norm.mean, stored[0]) and torch.equal(norm.var, stored[1])
    norm.calibrate(x.detach())
    with torch.no_grad():
        y = norm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3, 5), atol=1e-5, rtol=0)


def test_kspace_token_norm_only_when_asked_and_calibrated_after_stage1(volumes):
    """By default the encoder's tokens are its projection (the paper's encoder). --kspace-token-norm batch:
    standardised to the backbone's embedding RMS; stage 1's steps train through the batch statistics, and
    after stage 1 the stored statistics are those of the training slices under their evaluation masks."""
    mask = volume_mask(volumes[0].name, 16, 4, "random")
    kspace, m = masked(volumes[0], 0, 4, mask)
    model, tokenizer = tiny_model(init_std=0.2)
    assert model.encoder.token_norm is None
    with torch.no_grad():
        assert torch.equal(model.encoder(kspace, m)[0], model.encoder.projected_tokens(kspace, m)[0])
    model, tokenizer = tiny_model(init_std=0.2, kspace_token_norm="batch")
    norm = model.encoder.token_norm
    assert norm.scale == pytest.approx(model.embedding_rms(model.llm))
    vit_before = [p.detach().clone() for p in model.encoder.vit.parameters()]
    train_stage1("t", model, volumes, tokenizer, tiny_args(steps=3), np.random.default_rng(0))
    assert any(not torch.equal(a, b) for a, b in zip(vit_before, model.encoder.vit.parameters()))
    args = tiny_args()
    with torch.no_grad():
        projected = torch.cat(
            [
                model.encoder.projected_tokens(*masked(v, 0, 4, volume_mask(v.name, 16, acc, "random")))[0]
                for acc in args.train_acc
                for v in volumes
            ]
        )
    mean, var = SliceStandardise.statistics(projected)
    torch.testing.assert_close(norm.mean, mean)
    torch.testing.assert_close(norm.var, var)


def test_findings_are_read_from_both_report_grammars():
    anatomy = findings(
        "lesions: 2. left frontal: large irregular dark. right central: small round bright. level: basal ganglia."
    )
    assert anatomy == {"count": 2, "places": "left frontal, right central", "level": "basal ganglia"}
    assert findings("lesions: 0.") == {"count": 0, "places": "", "level": None}
    assert findings("vent ity of the") == {"count": None, "places": None, "level": None}


def test_findings_probe_reads_a_finding_the_features_hold_and_not_one_they_do_not():
    """Features that hold the lesion count (one-hot, plus noise) and nothing of where the one lesion is: the
    count probe is right on every test slice, far above always the most common count; the place probe can
    only tell no lesion from one, so it misses where the lesion is on about half the slices with one. The
    level, which no phantom report states, is left out."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, 120)
    sides = ["left frontal", "right central"]
    reports = [
        f"lesions: {c}." + "".join(f" {sides[rng.integers(2)]}: small round dark." for _ in range(c))
        for c in counts
    ]
    x = torch.from_numpy(np.eye(3)[counts] * 3 + 0.1 * rng.standard_normal((120, 3)))
    x = torch.cat([x, torch.from_numpy(rng.standard_normal((120, 5)))], dim=1)
    result = findings_probe(x[:60], reports[:60], x[60:90], reports[60:90], x[90:], reports[90:])
    assert set(result) == {"count", "places"}
    majority = max(range(3), key=counts[:60].tolist().count)
    assert result["count"]["majority"] == pytest.approx(np.mean(counts[90:] == majority))
    assert result["count"]["accuracy"] == 1.0 > result["count"]["majority"] + 0.3
    assert result["count"]["classes"] == 3
    with_lesion = counts[90:] > 0
    assert result["places"]["accuracy"] <= 1 - 0.25 * with_lesion.mean()


def test_data_consistency_keeps_the_measured_lines_and_fills_the_others_from_the_image(volumes):
    """KspaceEncoder.data_consistency: with every line sampled the result is the measured k-space's own RSS
    image whatever the decoder's image; otherwise each coil's k-space holds the measured lines where sampled
    and the image's (with the encoder's maps and phase) elsewhere; at a crop smaller than the field of view
    the image only replaces the crop."""
    model, _ = tiny_model()
    encoder = model.encoder
    kspace = torch.stack([volumes[0].kspace[0], volumes[1].kspace[0]])  # (2, C, 16, 16)
    magnitude = torch.rand(2, 16, 16, requires_grad=True)
    k0, _ = kspace_layer_norm(kspace, torch.ones(2, 16, dtype=torch.bool))
    every_line = torch.ones(2, 16, dtype=torch.bool)
    full = encoder.data_consistency(magnitude, *encoder.data_consistency_inputs(kspace, every_line))
    torch.testing.assert_close(full, center_crop(rss(ifft2c(k0)), (16, 16)))
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "equispaced", np.random.default_rng(s)) for s in (0, 1)])
    )
    out = encoder.data_consistency(
        magnitude, *encoder.data_consistency_inputs(kspace * mask[:, None, None, :], mask)
    )
    assert out.shape == (2, 16, 16) and torch.isfinite(out).all()
    out.sum().backward()  # stage-2-style gradients reach the decoder's image
    assert magnitude.grad.abs().sum() > 0
    with torch.no_grad():  # the same step by hand
        k0, _ = kspace_layer_norm(kspace * mask[:, None, None, :], mask)
        refined, sens = encoder.varnet.refine(k0, mask)
        image = sens_reduce(refined, sens)
        x = magnitude * image / image.abs().clamp_min(1e-12)
        expected = torch.where(mask[:, None, None, :], k0, sens_expand(x, sens))
        torch.testing.assert_close(out, rss(ifft2c(expected)))
        cropped = KspaceEncoder(32, (8, 8), 1, 4, 2, 32, 1, 1, 8)
        small = cropped.data_consistency(
            torch.zeros(2, 8, 8), *cropped.data_consistency_inputs(kspace * mask[:, None, None, :], mask)
        )
        refined, sens = cropped.varnet.refine(k0, mask)
        outside = sens_reduce(refined, sens)
        outside[:, 4:12, 4:12] = 0
        expected = torch.where(mask[:, None, None, :], k0, sens_expand(outside, sens))
        torch.testing.assert_close(small, center_crop(rss(ifft2c(expected)), (8, 8)))


def test_data_consistency_is_off_by_default_and_adds_its_rows_when_on(volumes):
    """The pipeline reconstructs through the step only with --data-consistency; its image then differs from
    the decoder's alone."""
    model, tokenizer = tiny_model()
    assert not model.data_consistency
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "equispaced", np.random.default_rng(s)) for s in (0, 1)])
    )
    kspace = torch.stack([volumes[0].kspace[0], volumes[1].kspace[0]]) * mask[:, None, None, :]
    prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]))
    with torch.no_grad():
        plain = model(kspace, mask, prompt_ids)
        torch.testing.assert_close(plain, model.decoder_alone(kspace, mask, prompt_ids))
        model.data_consistency = True
        stepped = model(kspace, mask, prompt_ids)
        torch.testing.assert_close(model.decoder_alone(kspace, mask, prompt_ids), plain)
        assert not torch.allclose(stepped, plain)
        # the step on the encoder's own image, its cascades run once: what encoder() and the step's inputs give
        refine, cascade_runs = model.encoder.varnet.refine, []
        model.encoder.varnet.refine = lambda *inputs: cascade_runs.append(1) or refine(*inputs)
        encoder_dc = model.encoder_image_with_data_consistency(kspace, mask)
        assert len(cascade_runs) == 1
        model.encoder.varnet.refine = refine
        _, image, scale = model.encoder(kspace, mask)
        measured = model.encoder.data_consistency_inputs(kspace, mask)
        expected = model.encoder.data_consistency(image.abs(), *measured) * scale.reshape(-1, 1, 1)
        torch.testing.assert_close(encoder_dc, expected)
        assert encoder_dc.shape == plain.shape


def test_stage2_trains_the_decoder_through_the_data_consistency_step(volumes):
    """With the step, stage 2's cache keeps what the step needs of each slice (the normalised undersampled
    k-space, mask, coil maps and the cascades' image), its validation loss is -SSIM of the pipeline's own
    output (the step included), and the decoder trains through it; the frozen cascades run while the cache is
    built, not at every training step."""
    model, tokenizer = tiny_model(data_consistency=True)
    prompt_ids = torch.tensor(tokenizer.encode(PROMPTS[0]))
    cache = cache_image_tokens(model, volumes[:1], prompt_ids, tiny_args(train_acc=[4]))
    (tokens, image, scale, target, maxval, k0, mask, sens, coil_image) = cache[0]
    assert k0.shape == sens.shape == (len(tokens), *volumes[0].kspace.shape[1:]) and mask.dtype == torch.bool
    assert coil_image.shape == (len(tokens), *volumes[0].kspace.shape[2:]) and coil_image.is_complex()
    mask0 = volume_mask(volumes[0].name, 16, 4, "random")
    with torch.no_grad():
        pred = model(*masked(volumes[0], 0, len(tokens), mask0), prompt_ids)
        alone = model.decoder_alone(*masked(volumes[0], 0, len(tokens), mask0), prompt_ids)
    expected = -ssim(pred, target, maxval).mean().item()
    assert abs(decoder_val_loss(model, cache, 8) - expected) < 1e-5
    assert abs(-ssim(alone, target, maxval).mean().item() - expected) > 1e-4
    before = state_fingerprint(model.decoder)
    refine, cascade_runs = model.encoder.varnet.refine, []
    model.encoder.varnet.refine = lambda *inputs: cascade_runs.append(1) or refine(*inputs)
    for steps in (4, 8):  # twice the steps, the same cascade runs: those of the cache alone
        train_stage2(
            "t",
            model,
            volumes,
            tokenizer,
            tiny_args(data_consistency=True, steps=steps),
            np.random.default_rng(0),
        )
        cascade_runs.append(None)
    assert not unchanged(model.decoder, before)
    first = cascade_runs.index(None)
    assert first > 0 and len(cascade_runs) == 2 * first + 2


def test_backbone_autocast_runs_the_backbone_in_bf16_and_hands_back_float32(volumes):
    """--backbone-autocast: the image tokens and the report loss come back float32 and close to the float32
    backbone's (bf16 rounding: relative error under 5%), gradients still reach the encoder and not the frozen
    weights, and the gate statistics (the Trigger's trace) still read."""
    model, tokenizer = tiny_model()
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.from_numpy(
        np.stack([make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)])
    )
    kspace = kspace * mask[:, None, None, :]
    prompt = torch.tensor(tokenizer.encode(PROMPTS[0]))
    reports = encode_reports(tokenizer, ["lesions: 0.", "lesions: 1. left frontal: small round dark."], "cpu")
    with torch.no_grad():
        exact_tokens = model.image_tokens(kspace, mask, prompt)[0]
        exact_loss = model.report_loss(kspace, mask, prompt, reports, tokenizer.eos_id)
    model.backbone_autocast = True
    with torch.no_grad():
        tokens = model.image_tokens(kspace, mask, prompt)[0]
    assert tokens.dtype == torch.float32 and not torch.equal(tokens, exact_tokens)  # bf16 did run
    assert (tokens - exact_tokens).norm() / exact_tokens.norm() < 5e-2
    loss = model.report_loss(kspace, mask, prompt, reports, tokenizer.eos_id)
    assert loss.dtype == torch.float32 and abs(loss.item() - exact_loss.item()) < 5e-2 * exact_loss.item()
    loss.backward()
    assert model.encoder.to_model.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())
    stats = gate_statistics(model, volumes, torch.tensor(tokenizer.encode("hi")), 8, tiny_args())
    assert stats["p_slice_std_queries"][0] > 0
    assert tiny_args().backbone_autocast is False  # off by default
