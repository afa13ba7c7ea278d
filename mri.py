"""
The paper's MRI experiment (Sec. 3.2.2, Appendix A.6): a frozen language backbone (Nirvana, or any other
variant of nirvana.py for Fig. 4) with a trainable k-space encoder and image decoder, post-trained in two
stages, scored against a zero-filled reconstruction, a U-Net on the zero-filled image and E2E-VarNet on
the same data and masks.

    python mri.py                                   # synthetic phantoms, tiny sizes, CPU minutes
    python mri.py --data /path/to/multicoil_files   # fastMRI multi-coil .h5 files (split by volume)
    python mri.py --backbone ckpt.pt --backbone notrigger.pt --backbone transformer.pt  # train.py checkpoints
    python mri.py --generate DIR --volumes 200 --slices 16 --size 64   # only write a synthetic data set
    python mri.py --generate data/anatomy --anatomy --volumes 200 --slices 16 --size 64 --coils 8
                                                    # ... of real anatomy (the Colin27 brain of mricron-data)
    python mri.py --anatomy PATH.nii.gz             # a run on volumes of any T1 NIfTI head image

Sequence fed to the backbone: [k-space tokens][prompt tokens][M image-query embeddings][report tokens].
Stage 0 (this code's choice, --encoder-pretrain-steps 0 turns it off) trains the encoder's VarNet cascades to
reconstruct (-SSIM on their own image); stage 1 trains the encoder (and the image queries) with cross-entropy
on the report tokens, leaving the cascades as stage 0 made them (--stage1-cascades); stage 2 trains the image
decoder alone with -SSIM (eq. 9). Every stage and baseline takes --steps optimizer steps (--stage1-steps can
give stage 1 more: see README on its cross-entropy). The backbone's weights never change (unless
--stage1-backbone train, a diagnostic); its Trigger still adapts p.
--image-skip (an ablation, off by default) also hands the decoder the encoder's image, a path around the
backbone; the run then scores "skip only" too (the backbone's image tokens replaced by their mean).
--data-consistency (not in the paper, off by default) replaces the sampled k-space lines of the decoder's image
by the measured ones; the run then also scores the decoder alone and the step on the encoder's own image.
--queries-see-kspace (not in the paper, off by default) adds a learned projection of the mean k-space token to
every image query, next to the report (on the GPU, at 300 steps, it made neither the images nor the reports
better: README).
--kspace-token-norm batch (not in the paper, off by default) standardises the k-space tokens over the slices of
each stage-1 batch, so the backbone gets only what differs between slices, at the size of a word embedding.
--backbone-autocast (off by default) runs the frozen backbone under bfloat16 autocast, as train.py trains it: on
a GPU its kernels then take their bf16 paths (with float32 they take their exact float32 paths).
--diagnose measures whether the image passes through the backbone (decoder SSIM with another slice's tokens
or the mean token, linear probes of the tokens) and whether the report depends on the slice (its
cross-entropy with another slice's k-space); see mri_recon/diagnostics.py.
Every trained method keeps the checkpoint of its best validation loss (the validation volumes; the test
volumes are only scored). Outputs in --out: results.md / results.json (SSIM, PSNR, NMSE per method and
acceleration like Table 11, validation SSIM, gate and Trigger statistics of each backbone),
recon_grid_<acc>x.png (ground truth, zero-filled, baselines, each backbone; SSIM in each title),
training_curves.png, reports.md; a generated data set (--generate DIR, or <out>/synthetic, <out>/anatomy) comes
with preview.png, a few of its slices and their reports.
The code is in the mri_recon package; this script checks the options and runs its steps.
"""

import argparse
import gzip
import os
import shlex
import sys
import time

from cli import (
    ArgumentParser,
    existing_file,
    no_half_made_output,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_list,
    run_main,
)
from mri_recon.masks import ACCELERATIONS


def accelerations(text):
    """'4,8' -> [4, 8]: accelerations of Table 10."""
    values = positive_int_list(text)
    for value in values:
        if value not in ACCELERATIONS:
            raise argparse.ArgumentTypeError(
                f"acceleration {value} is not in Table 10 ({sorted(ACCELERATIONS)})"
            )
    return values


def volume_folder(text):
    """--data: a folder that holds .h5 files."""
    if not os.path.isdir(text):
        what = "is a file" if os.path.exists(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}; give a folder of fastMRI multi-coil .h5 files")
    if not any(name.endswith(".h5") for name in os.listdir(text)):
        raise argparse.ArgumentTypeError(
            f"no .h5 files in {text}; give a folder of fastMRI multi-coil .h5 files"
        )
    return text


DEFAULT_ANATOMY = "/usr/share/mricron/templates/ch2.nii.gz"  # the Colin27 T1 brain of Debian's mricron-data


def nifti_file(text):
    """--anatomy: an existing NIfTI-1 or NIfTI-2 image, .nii or .nii.gz, checked by its header's magic."""
    if not os.path.isfile(text):
        what = "is a folder" if os.path.isdir(text) else "does not exist"
        hint = (
            "; install it with `apt-get install mricron-data` (Debian/Ubuntu) or give another T1 NIfTI image"
            if text == DEFAULT_ANATOMY
            else "; give a T1 NIfTI head image (.nii or .nii.gz)"
        )
        raise argparse.ArgumentTypeError(f"{text} {what}{hint}")
    if not text.endswith((".nii", ".nii.gz")):
        raise argparse.ArgumentTypeError(f"{text} is not named .nii or .nii.gz; give a NIfTI image")
    try:
        with (gzip.open if text.endswith(".gz") else open)(text, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError) as error:
        raise argparse.ArgumentTypeError(f"{text}: unreadable ({error}); give a NIfTI image") from None
    if header[344:348] != b"n+1\0" and header[4:8] != b"n+2\0":  # NIfTI-1 / NIfTI-2 magic
        raise argparse.ArgumentTypeError(f"{text} has no NIfTI-1 or NIfTI-2 header; give a NIfTI image")
    return text


def output_folder(text):
    """--out, --generate: a folder, created if missing (not an existing file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (it is created if missing)")
    return text


def parse_args(argv=None):
    p = ArgumentParser(
        prog="mri.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        type=volume_folder,
        help="folder of fastMRI multi-coil .h5 files (default: synthetic phantoms)",
    )
    p.add_argument("--out", type=output_folder, default="mri_out", help="output folder")
    p.add_argument(
        "--generate",
        type=output_folder,
        metavar="DIR",
        help="only write a synthetic data set (phantoms, or --anatomy) to DIR and exit",
    )
    p.add_argument(
        "--anatomy",
        nargs="?",
        const=DEFAULT_ANATOMY,
        metavar="NIFTI",
        help=f"volumes of real anatomy from this T1 NIfTI head image instead of phantoms (no value: "
        f"{DEFAULT_ANATOMY}, `apt-get install mricron-data`), for a run or --generate",
    )
    p.add_argument(
        "--backbone", action="append", default=[], type=existing_file, help="train.py checkpoint (repeatable)"
    )
    p.add_argument(
        "--variants",
        default="nirvana,nirvana-notrigger",
        help="tiny random-init backbones to build when no --backbone is given",
    )
    p.add_argument("--volumes", type=positive_int, default=16, help="synthetic volumes (phantoms or anatomy)")
    p.add_argument("--slices", type=positive_int, default=6, help="synthetic slices per volume")
    p.add_argument("--size", type=positive_int, default=32, help="synthetic image size")
    p.add_argument("--coils", type=positive_int, default=4, help="synthetic coils")
    p.add_argument(
        "--max-volumes",
        type=non_negative_int,
        default=0,
        help="use at most this many files from --data (0: all)",
    )
    p.add_argument(
        "--train-acc", type=accelerations, default="4,8", help="accelerations seen in training (Table 10)"
    )
    p.add_argument("--eval-acc", type=accelerations, default="4,8", help="accelerations scored")
    p.add_argument("--mask-type", default="random", choices=["random", "equispaced"])
    p.add_argument(
        "--steps", type=positive_int, default=100, help="optimizer steps per baseline and per Nirvana stage"
    )
    p.add_argument(
        "--encoder-pretrain-steps",
        type=non_negative_int,
        help="stage 0: steps training the encoder's VarNet cascades for reconstruction before stage 1 "
        "(default: --steps; 0: off, the paper's two stages alone)",
    )
    p.add_argument(
        "--encoder-findings-steps",
        type=non_negative_int,
        default=0,
        help="not in the paper, off by default: before stage 1, this many steps train the encoder (what stage 1 "
        "trains of it) with a linear head per report finding (lesion count, places, level) on its k-space "
        "tokens, so that the tokens name the findings before the report is asked for them",
    )
    p.add_argument(
        "--stage1-steps",
        type=positive_int,
        help="stage 1: steps training the encoder and image queries on the report cross-entropy (default: "
        "--steps; the image methods and stages keep --steps)",
    )
    p.add_argument(
        "--stage1-cascades",
        choices=["train", "freeze"],
        help="whether stage 1 also trains the encoder's VarNet cascades on the report (default: freeze after "
        "stage 0, which made them a reconstruction network; train without stage 0, the paper's recipe)",
    )
    p.add_argument(
        "--stage1-backbone",
        choices=["freeze", "train"],
        default="freeze",
        help="diagnostic, not the paper's recipe: 'train' lets stage 1 train the backbone's weights too (its "
        "lr --lr), so the reports no longer rest on steering a frozen model; stage 2 and every score then use "
        "the tuned backbone (default: freeze)",
    )
    p.add_argument(
        "--kspace-token-norm",
        choices=["none", "batch"],
        default="none",
        help="not in the paper: 'batch' standardises the k-space tokens over the slices of each stage-1 batch "
        "(per feature, to the backbone's embedding RMS; batch norm, without its affine), so the backbone gets "
        "only what differs between slices and stage 1 cannot shrink it (default: none, the paper's encoder)",
    )
    p.add_argument(
        "--image-skip",
        action="store_true",
        help="ablation: the image decoder also gets the encoder's image (a path around the backbone); "
        "adds a 'skip only' row (the backbone's tokens replaced by their mean)",
    )
    p.add_argument(
        "--data-consistency",
        action="store_true",
        help="not in the paper: after the decoder, replace the sampled k-space lines of its image (with the "
        "encoder's coil maps and phase) by the measured ones; adds rows for the decoder alone and for the "
        "step on the encoder's own image (no backbone)",
    )
    p.add_argument(
        "--queries-see-kspace",
        action="store_true",
        help="not in the paper: every image query gets a learned projection of the mean k-space token added "
        "(zero at init: the paper's queries), so what the encoder found sits right before the report",
    )
    p.add_argument(
        "--backbone-autocast",
        action="store_true",
        help="run the frozen backbone under bfloat16 autocast, as train.py trains it (its kernels' bf16 paths: "
        "faster on a GPU); the encoder, queries and decoder stay float32, reports are decoded in float32",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="after stage 2: decoder SSIM with another slice's / the mean image tokens, linear probes of the "
        "tokens for the zero-filled image, the report's cross-entropy with another slice's k-space (results.md)",
    )
    p.add_argument(
        "--phase-seconds",
        type=non_negative_float,
        default=0,
        help="time budget of each training phase: fewer steps if --steps would not fit (0: no limit)",
    )
    p.add_argument(
        "--val-checks",
        type=positive_int,
        default=4,
        help="validation checks per training phase; the best checkpoint is kept",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--chans", type=positive_int, default=8, help="U-Net width in VarNet cascades")
    p.add_argument("--sens-chans", type=positive_int, default=4, help="U-Net width of the sensitivity model")
    p.add_argument(
        "--pools",
        type=non_negative_int,
        default=2,
        help="U-Net pooling levels (image decoder and U-Net baseline)",
    )
    p.add_argument("--varnet-cascades", type=positive_int, default=4, help="E2E-VarNet baseline cascades")
    p.add_argument("--unet-chans", type=positive_int, default=24, help="U-Net baseline width")
    p.add_argument(
        "--enc-cascades", type=non_negative_int, default=2, help="VarNet cascades in the k-space encoder"
    )
    p.add_argument(
        "--vit-dim",
        type=positive_int,
        default=64,
        help="T2T-ViT width in the k-space encoder (a multiple of 4 and of its heads, one per 32)",
    )
    p.add_argument("--vit-depth", type=non_negative_int, default=2)
    p.add_argument(
        "--vit-stride",
        type=int,
        choices=[4, 8, 16],
        default=16,
        help="image pixels per k-space token (side): T2T-ViT soft splits 7/4, then 3/2 until this stride; "
        "16 gives (size/16)^2 k-space tokens",
    )
    p.add_argument("--patch", type=positive_int, default=8, help="image pixels per image-query token (side)")
    p.add_argument("--dec-chans", type=positive_int, default=16, help="image decoder U-Net width")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.anatomy is not None:
        if args.data:
            p.error("--anatomy and --data exclude each other: --data reads files, --anatomy generates them")
        try:
            nifti_file(args.anatomy)  # here, not as the type: argparse does not check the value-less default
        except argparse.ArgumentTypeError as error:
            p.error(f"argument --anatomy: {error}")
    if args.encoder_pretrain_steps is None:
        args.encoder_pretrain_steps = args.steps
    if args.stage1_steps is None:
        args.stage1_steps = args.steps
    if args.stage1_cascades is None:
        args.stage1_cascades = "freeze" if args.encoder_pretrain_steps else "train"
    elif args.stage1_cascades == "freeze" and not args.encoder_pretrain_steps:
        p.error(
            "--stage1-cascades freeze needs stage 0 (--encoder-pretrain-steps > 0): frozen random cascades"
        )
    if not args.data and not args.generate:  # the synthetic data of a run
        if args.volumes < 3:
            p.error(f"--volumes {args.volumes}: train, validation and test need at least 3 volumes")
        if args.size % args.patch:
            p.error(
                f"--size {args.size} must be a multiple of --patch {args.patch} (the image decoder's tokens)"
            )
    args.command = shlex.join(["python", "mri.py", *(sys.argv[1:] if argv is None else argv)])  # results.md
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from mri_recon import experiment  # torch and the models, imported once the options are known to be good

    rng = experiment.set_up(args)
    if args.generate:
        experiment.generate(args)
        return
    experiment.check_run(args)  # before any training: backbones load, --data holds volumes, ...
    t_start = time.time()
    with no_half_made_output(args.out) as keep:  # a failed run removes what it wrote, but the results so far
        data = experiment.load_data(args)
        run = experiment.Run()
        backbones = experiment.load_backbones(args)
        names = [backbone[0] for backbone in backbones]
        experiment.train_baselines(run, data, args, rng)
        for i, backbone in enumerate(backbones):  # the results so far are written after each method
            experiment.evaluate_and_write(run, data, args, t_start, still_to_train=names[i:])
            keep()
            experiment.train_backbone(run, backbone, data, args, rng)
        experiment.evaluate_and_write(run, data, args, t_start)


if __name__ == "__main__":
    run_main(main)
