"""The paper's MRI experiment (Sec. 3.2.2, Appendix A.6) as a package; `python mri.py` runs it.

Named mri_recon, not mri, because the script mri.py sits beside it: with a folder mri/ next to mri.py,
`import mri` would find the package and the script could no longer be imported (by its tests) under its name.

    fourier.py        centred FFTs, root sum of squares, centre crop
    phantoms.py       synthetic brain phantoms with lesions and templated reports, written as fastMRI files;
                      the lesions, report grammar, simulated acquisition and parallel writer anatomy.py shares
    anatomy.py        volumes of real anatomy (one T1 NIfTI head image, e.g. Colin27) with those lesions
    fastmri_files.py  reading / writing / listing fastMRI multi-coil .h5 files, the split by volume
    masks.py          undersampling masks of Table 10
    batches.py        training batches and undersampled evaluation slices
    models.py         U-Net, E2E-VarNet, the baselines, T2T-ViT, the k-space encoder and the image decoder
    pipeline.py       the frozen language backbone around them (every call into the language model is there)
    backbones.py      loading train.py checkpoints or tiny random backbones; the frozen-weights fingerprint
    fit.py            the training loop (AdamW, train.py's schedule, time budget, model selection)
    training.py       what each method trains: baselines, stage 0, stage 1, stage 2
    evaluation.py     scoring on held-out volumes, test reports, gate / Trigger statistics between slices
    diagnostics.py    does the image pass through the backbone (token swaps, linear probes), does the report
                      depend on the slice (its cross-entropy with another slice's k-space) (--diagnose)
    metrics.py        SSIM / PSNR / NMSE as fastMRI computes them, report scores, the majority baseline
    results.py        the Markdown of the results and of the generated reports
    plots.py          training curves, reconstruction grids, the preview of a generated data set
    experiment.py     the steps of `python mri.py`: checks, data, training, evaluation, outputs
"""
