"""Tests of mri.py (CPU, tiny sizes): masks, fastMRI metrics, the .h5 round trip and its errors, the networks'
shapes, both post-training stages, the frozen backbone whose Trigger still adapts, train.py checkpoints of
other variants (the transformer of Fig. 4) as backbones, and model selection on the validation split."""
import os

import h5py
import numpy as np
import pytest
import torch

import mri
import train
from nirvana import Nirvana, NirvanaConfig
from prepare import prepare
from tokenizer import load_tokenizer


# ---------------------------------------------------------------- masks (Table 10)

@pytest.mark.parametrize("acc", sorted(mri.ACCELERATIONS))
@pytest.mark.parametrize("num_cols", [64, 320, 368])
def test_equispaced_mask_acceleration_and_centre(acc, num_cols):
    mask = mri.make_mask(num_cols, acc, "equispaced", np.random.default_rng(acc))
    num_low = max(1, round(num_cols * mri.ACCELERATIONS[acc]))
    assert mask.sum() == round(num_cols / acc)
    c = num_cols // 2
    assert mri.centre_lines(torch.from_numpy(mask)[None])[0].sum() >= num_low   # the centre block is sampled
    start = (num_cols - num_low + 1) // 2
    assert mask[start:start + num_low].all() and start <= c < start + num_low


@pytest.mark.parametrize("acc", sorted(mri.ACCELERATIONS))
def test_random_mask_acceleration_in_expectation(acc):
    num_cols, rng = 320, np.random.default_rng(0)
    num_low = round(num_cols * mri.ACCELERATIONS[acc])
    masks = np.stack([mri.make_mask(num_cols, acc, "random", rng) for _ in range(400)])
    start = (num_cols - num_low + 1) // 2
    assert masks[:, start:start + num_low].all()
    assert abs(masks.sum(1).mean() - num_cols / acc) < 0.05 * num_cols / acc


def test_volume_mask_is_reproducible_and_differs_between_volumes():
    a = mri.volume_mask("file_a.h5", 128, 8, "random")
    assert np.array_equal(a, mri.volume_mask("file_a.h5", 128, 8, "random"))
    assert not np.array_equal(a, mri.volume_mask("file_b.h5", 128, 8, "random"))


def test_mask_rejects_unknown_acceleration_and_kind():
    with pytest.raises(ValueError, match="Table 10"):
        mri.make_mask(64, 5, "random", np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask kind"):
        mri.make_mask(64, 4, "spiral", np.random.default_rng(0))


# ---------------------------------------------------------------- metrics (fastMRI definitions)

def ssim_by_hand(x, y, data_range):
    """skimage's formula written out window by window: 7x7 windows fully inside, sample (co)variances."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 6):
        for j in range(x.shape[1] - 6):
            a, b = x[i:i + 7, j:j + 7].ravel(), y[i:i + 7, j:j + 7].ravel()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - a.mean()) * (b - b.mean())).sum() / (a.size - 1)
            values.append((2 * a.mean() * b.mean() + c1) * (2 * cov + c2)
                          / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (va + vb + c2)))
    return np.mean(values)


def test_ssim_equals_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(10, 9))
    y = x + 0.3 * rng.standard_normal((10, 9))
    got = mri.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None], torch.tensor([x.max()], dtype=torch.float64))
    assert got.item() == pytest.approx(ssim_by_hand(x, y, x.max()), rel=1e-10)


def test_ssim_of_constant_images_and_of_an_image_with_itself():
    x = torch.full((1, 7, 7), 0.2, dtype=torch.float64)
    y = torch.full((1, 7, 7), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)     # variances are 0: the c2 terms cancel
    assert mri.ssim(x, y, torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)
    z = torch.rand(2, 16, 12, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(mri.ssim(z, z, one), one)


def test_psnr_and_nmse_equal_hand_values():
    gt = torch.zeros(2, 8, 8, dtype=torch.float64)
    gt[0, :4] = 2.0                                                  # max 2, ||gt||^2 = 32 * 4 = 128
    pred = gt.clone()
    pred[1, 0, 0] = 0.5                                              # one error of 0.5 over 128 pixels
    m = mri.volume_metrics(gt, pred)
    assert m["psnr"] == pytest.approx(10 * np.log10(2.0 ** 2 / (0.25 / 128)))
    assert m["nmse"] == pytest.approx(0.25 / 128)
    same = mri.volume_metrics(gt + 1, gt + 1)
    assert same["ssim"] == pytest.approx(1.0) and same["nmse"] == 0.0


# ---------------------------------------------------------------- data: generator, h5 round trip, errors

def test_h5_round_trip_and_fastmri_layout(tmp_path):
    rng = np.random.default_rng(1)
    kspace, target, reports = mri.make_volume(rng, n_slices=4, size=16, n_coils=3, readout_oversampling=2)
    assert kspace.shape == (4, 3, 32, 16) and kspace.dtype == np.complex64 and target.shape == (4, 16, 16)
    # the target is the RSS of the fully sampled coil images, cropped to the field of view
    rss = mri.center_crop(mri.rss(mri.ifft2c(torch.from_numpy(kspace))), (16, 16))
    assert torch.allclose(rss, torch.from_numpy(target), rtol=1e-5, atol=1e-6)
    path = str(tmp_path / "vol.h5")
    mri.write_volume(path, kspace, target, reports, patient_id="p0")
    with h5py.File(path) as f:
        assert {"kspace", "reconstruction_rss", "reports"} <= set(f) and f.attrs["max"] == pytest.approx(target.max())
    v = mri.read_volume(path)
    assert np.array_equal(v.kspace.numpy(), kspace) and np.array_equal(v.target.numpy(), target)
    assert v.reports == reports and v.name == "vol.h5" and v.maxval == pytest.approx(float(target.max()))


def test_reports_follow_the_lesions():
    lesion = mri.Lesion("left", "frontal", "small", "round", "bright", -0.5, -0.55, 0.08, 0.0, 0, 0)
    text = mri.report_text([lesion])
    assert text == "lesions: 1. left frontal: small round bright."
    assert mri.parse_report(text) == (1, [("left", "frontal", "small", "round", "bright")])
    assert mri.parse_report("garbage") == (None, [])
    assert mri.score_reports([text, "lesions: 0.", "xx"], [text, text, "lesions: 0."]) == {
        "count_acc": 1 / 3, "place_acc": 1 / 3, "exact": 1 / 3, "n": 3}


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        mri.read_volume(str(tmp_path / "missing.h5"))
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match="corrupt"):
        mri.read_volume(str(corrupt))
    no_target = str(tmp_path / "no_target.h5")
    with h5py.File(no_target, "w") as f:
        f["kspace"] = np.zeros((2, 3, 8, 8), np.complex64)
    with pytest.raises(ValueError, match="reconstruction_rss"):
        mri.read_volume(no_target)
    single_coil = str(tmp_path / "single.h5")
    with h5py.File(single_coil, "w") as f:
        f["kspace"] = np.zeros((2, 8, 8), np.complex64)
        f["reconstruction_rss"] = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="single-coil"):
        mri.read_volume(single_coil)
    bad_slices = str(tmp_path / "bad_slices.h5")
    with h5py.File(bad_slices, "w") as f:
        f["kspace"] = np.zeros((2, 3, 8, 8), np.complex64)
        f["reconstruction_rss"] = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match="slices"):
        mri.read_volume(bad_slices)


def test_split_by_volume_is_disjoint_and_seeded():
    paths = [f"v{i}.h5" for i in range(20)]
    train, val, test = mri.split_by_volume(paths, seed=3)
    assert sorted(train + val + test) == sorted(paths) and not (set(train) & set(test))
    assert (train, val, test) == mri.split_by_volume(paths, seed=3) and len(test) >= 1


# ---------------------------------------------------------------- networks and the two stages

def tiny_data(tmp_path, volumes=3, slices=4, size=16, coils=2):
    paths = mri.generate_dataset(str(tmp_path / "data"), volumes, slices, size, coils, seed=0)
    return mri.load_volumes(paths, "cpu")


def tiny_args(**overrides):
    args = mri.parse_args(["--steps", "25", "--batch-size", "4", "--size", "16", "--chans", "4", "--sens-chans", "2",
                           "--pools", "1", "--enc-cascades", "1", "--vit-dim", "32", "--vit-depth", "1",
                           "--patch", "4", "--dec-chans", "8", "--lr", "3e-3", "--device", "cpu"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def tiny_model(variant="nirvana", init_std=0.02):
    """A tiny random backbone. init_std 0.2 gives it an output layer that can be confident, as a pretrained
    one is (at 0.02 its logits are bounded near uniform and stage 1 can hardly move the loss)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("bytes")
    llm = Nirvana(NirvanaConfig.from_preset(f"{variant}-tiny", vocab_size=tokenizer.vocab_size,
                                            n_layers=3, window=16, init_std=init_std)).eval()
    return mri.build_nirvana_mri(llm, (16, 16), tiny_args()), tokenizer


def test_baselines_and_encoder_shapes():
    kspace = torch.randn(2, 3, 32, 16, dtype=torch.complex64)
    mask = torch.from_numpy(np.stack([mri.make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)]))
    kspace = kspace * mask[:, None, None, :]
    assert mri.E2EVarNet(2, 4, 2, 1)(kspace, mask, (16, 16)).shape == (2, 16, 16)
    assert mri.UNetBaseline(4, 2)(kspace, mask, (16, 16)).shape == (2, 16, 16)
    tokens, scale = mri.KspaceEncoder(48, (16, 16), 1, 4, 2, 32, 1, 1)(kspace, mask)
    assert tokens.shape == (2, 1, 48) and scale.shape == (2,)
    assert mri.ImageDecoder(48, (16, 16), 4, 8, 1)(torch.randn(2, 16, 48)).shape == (2, 16, 16)
    with pytest.raises(ValueError, match="patch"):
        mri.ImageDecoder(48, (18, 16), 4, 8, 1)


def test_centre_lines_are_the_contiguous_run_around_the_centre():
    mask = torch.tensor([[1, 0, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mri.centre_lines(mask), expected)


def test_nirvana_reconstruction_scales_with_the_kspace():
    """The k-space LayerNorm makes the tokens scale-free, and the decoder output is multiplied back: a volume
    recorded 10x stronger reconstructs 10x brighter (fastMRI volumes differ in signal level by orders)."""
    model, tokenizer = tiny_model()
    model.eval()
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.from_numpy(np.stack([mri.make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)]))
    kspace = kspace * mask[:, None, None, :]
    prompt = torch.tensor(tokenizer.encode("hi"))
    with torch.no_grad():
        base, scaled = model(kspace, mask, prompt), model(10 * kspace, mask, prompt)
    assert torch.allclose(scaled, 10 * base, rtol=1e-3, atol=1e-6)


def test_both_stages_reduce_their_loss_and_the_backbone_stays_frozen(tmp_path):
    volumes = tiny_data(tmp_path)
    model, tokenizer = tiny_model(init_std=0.2)
    args, rng = tiny_args(), np.random.default_rng(0)
    fingerprint = mri.state_fingerprint(model.llm)
    decoder_before = mri.state_fingerprint(model.decoder)
    stage1 = mri.train_stage1("t", model, volumes, tokenizer, args, rng)
    assert mri.unchanged(model.decoder, decoder_before)                  # stage 1 trains the encoder only
    encoder_before = mri.state_fingerprint(model.encoder)
    queries_before = model.image_queries.detach().clone()
    stage2 = mri.train_stage2("t", model, volumes, tokenizer, args, rng)
    assert np.mean(stage1.losses[-5:]) < np.mean(stage1.losses[:5]) - 0.3
    assert np.mean(stage2.losses[-5:]) < np.mean(stage2.losses[:5]) - 0.02
    assert mri.unchanged(model.encoder, encoder_before) and torch.equal(model.image_queries, queries_before)
    assert mri.unchanged(model.llm, fingerprint)                         # bit-equal after both stages
    assert all(not p.requires_grad for p in model.llm.parameters())


def test_gradients_flow_through_the_frozen_backbone_and_the_trigger_adapts():
    model, tokenizer = tiny_model()
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.from_numpy(np.stack([mri.make_mask(16, 4, "random", np.random.default_rng(i)) for i in range(2)]))
    prompt = torch.tensor(tokenizer.encode(mri.PROMPTS[0]))
    reports = mri.encode_reports(tokenizer, ["lesions: 0.", "lesions: 1. left frontal: small round dark."], "cpu")
    model.report_loss(kspace * mask[:, None, None, :], mask, prompt, reports, tokenizer.eos_id).backward()
    assert model.encoder.to_model.weight.grad.abs().sum() > 0              # reached the encoder through the LLM
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
    assert not torch.allclose(traces[0], traces[1])                        # p depends on the k-space input
    assert not torch.allclose(traces[0], torch.ones_like(traces[0]))       # and moved from p^0 = ones


def test_fit_restores_the_parameters_of_the_best_validation_check():
    """Model selection: four checks score 3, 1, 2, 4; fit must end with the parameters seen at the second."""
    w = torch.nn.Parameter(torch.zeros(3))
    scores, seen = [3.0, 1.0, 2.0, 4.0], []

    def validate():
        seen.append(w.detach().clone())
        return scores[len(seen) - 1]

    batches = iter(lambda: None, 1)                                   # endless; the loss needs no batch
    result = mri.fit("w", [w], lambda _: (w - 5).pow(2).sum(), batches, steps=20, lr=0.1, validate=validate,
                     checks=4)
    assert [s for s, _ in result.checks] == [5, 10, 15, 20] and result.best_step == 10
    assert torch.equal(w.detach(), seen[1]) and not torch.equal(seen[1], seen[3])
    assert len(result.losses) == 20


@pytest.fixture(scope="module")
def pretrained_backbones(tmp_path_factory):
    """train.py checkpoints (2 steps on a byte-level corpus) of three variants, sized with --set."""
    root = tmp_path_factory.mktemp("backbones")
    texts = []
    for i in range(5):
        texts.append(root / f"doc{i}.txt")
        texts[-1].write_text(f"lesions: {i}. left frontal: small round bright. the k-space holds the image. " * 20)
    prepare([str(t) for t in texts], str(root / "data"), "bytes", val_fraction=0.2)
    paths = {}
    for variant in ("nirvana", "nirvana-notrigger", "transformer"):
        out = root / variant
        train.main(["--preset", f"{variant}-tiny", "--set", "n_layers=3", "--set", "window=256", "--data",
                    str(root / "data"), "--out", str(out), "--max-tokens", "512", "--micro-batch", "2",
                    "--seq-len", "64", "--global-batch-tokens", "256", "--warmup-tokens", "256", "--eval-every", "2",
                    "--eval-tokens", "128", "--device", "cpu"])
        paths[variant] = str(out / "ckpt.pt")
    return paths


def test_backbones_sized_with_train_py_set_keep_their_config(pretrained_backbones):
    config = Nirvana.from_checkpoint(pretrained_backbones["transformer"]).config
    assert (config.variant, config.n_layers, config.window) == ("transformer", 3, 256)


@pytest.mark.parametrize("variant", ["transformer", "nirvana-notrigger"])
def test_any_variant_checkpoint_is_a_frozen_backbone(tmp_path, pretrained_backbones, variant):
    """A transformer (no Trigger, no gates) or nirvana-notrigger (gates, no p) checkpoint runs both stages,
    stays bit-equal, generates reports, and has the gate statistics it can have."""
    volumes = tiny_data(tmp_path)
    args = tiny_args(backbone=[pretrained_backbones[variant]], steps=4)
    [(name, llm, tokenizer, how)] = mri.load_backbones(args)
    assert name == f"LLM[{variant}]" and "pretrained 2 steps" in how and "validation loss" in how
    model = mri.build_nirvana_mri(llm, (16, 16), args)
    seq_len = mri.mri_sequence_length(model, (16, 16), tokenizer, [r for v in volumes for r in v.reports])
    assert seq_len == 1 + max(len(tokenizer.encode(p)) for p in mri.PROMPTS) + 16 + max(
        len(tokenizer.encode(r)) for v in volumes for r in v.reports) + 1
    assert "fits in the window" in mri.window_note(llm, seq_len)
    assert "WARNING" in mri.window_note(llm, 300)
    fingerprint = mri.state_fingerprint(llm)
    rng = np.random.default_rng(0)
    mri.train_stage1(name, model, volumes[:2], tokenizer, args, rng, volumes[2:])
    fit2 = mri.train_stage2(name, model, volumes[:2], tokenizer, args, rng, volumes[2:])
    assert mri.unchanged(llm, fingerprint) and len(fit2.checks) == args.val_checks
    prompt = torch.tensor(tokenizer.encode(mri.PROMPTS[0]))
    generated, truth = mri.generate_test_reports(model, volumes[2:], tokenizer, 4, args, max_len=8)
    assert len(generated) == len(truth) == 4
    stats = mri.gate_statistics(model, volumes, prompt, 4, args)
    if variant == "transformer":
        assert stats is None
    else:
        assert len(stats["gate_queries"]) == 1 and "p_shift_queries" not in stats


def test_gate_statistics_see_the_trigger_move_p(tmp_path):
    volumes = tiny_data(tmp_path)
    model, tokenizer = tiny_model()
    stats = mri.gate_statistics(model, volumes, torch.tensor(tokenizer.encode("hi")), 8, tiny_args())
    assert stats["slices"] == 3 and len(stats["p_shift_queries"]) == 1
    assert 0 < stats["gate_kspace"][0] < 1 and stats["p_shift_kspace"][0] > 0 and stats["p_slice_std_queries"][0] > 0


def test_cached_report_generation_equals_greedy_full_recompute():
    model, tokenizer = tiny_model(init_std=0.2)
    kspace = torch.randn(2, 2, 16, 16, dtype=torch.complex64)
    mask = torch.ones(2, 16, dtype=torch.bool)
    prompt = torch.tensor(tokenizer.encode("hi"))
    ids = model.generate_reports(kspace, mask, prompt, tokenizer.eos_id, max_len=6)
    assert len(ids) == 2 and all(len(i) <= 6 and tokenizer.eos_id not in i for i in ids)
    with torch.no_grad():
        seq, _ = model.prefix(kspace, mask, prompt)
        steps = []
        for _ in range(6):                                             # greedy, recomputing the whole sequence
            steps.append(model.llm.lm_head(model.llm.backbone(seq)[:, -1]).argmax(-1))
            seq = torch.cat([seq, model.llm.embed(steps[-1][:, None])], dim=1)
    for got, want in zip(ids, torch.stack(steps, 1).tolist()):
        want = want[:want.index(tokenizer.eos_id)] if tokenizer.eos_id in want else want
        assert got == want


def test_main_end_to_end_writes_outputs(tmp_path):
    out = str(tmp_path / "out")
    mri.main(["--out", out, "--volumes", "4", "--slices", "3", "--size", "16", "--coils", "2", "--steps", "2",
              "--batch-size", "4", "--chans", "4", "--sens-chans", "2", "--pools", "1", "--enc-cascades", "1",
              "--varnet-cascades", "1", "--unet-chans", "4", "--vit-dim", "32", "--vit-depth", "1", "--patch", "4",
              "--dec-chans", "4", "--variants", "nirvana", "--device", "cpu"])
    for name in ("results.md", "results.json", "reports.md", "recon_grid_4x.png", "recon_grid_8x.png",
                 "training_curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    table = open(os.path.join(out, "results.md")).read()
    for method in ("zero-filled", "U-Net", "E2E-VarNet", "LLM[nirvana]"):
        assert method in table
