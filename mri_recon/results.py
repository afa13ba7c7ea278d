"""The written results: Table 11-like Markdown with the gate / Trigger statistics, and the generated reports
beside their templated truth."""

from mri_recon.masks import ACCELERATIONS


def results_markdown(summary, params, notes, val_summary=None, gates=None):
    """Table 11-like tables (test split; the validation SSIM beside it when there is a validation split) and
    the gate / Trigger statistics of each backbone that has them."""
    lines = [
        "# MRI reconstruction (mri.py)",
        "",
        *notes,
        "",
        "Per-volume SSIM / PSNR / NMSE as fastMRI computes them (data range = volume max), mean ± std over "
        "test volumes"
        + (
            "; val SSIM: the same on the validation volumes, which chose each trained method's checkpoint"
            if val_summary
            else ""
        )
        + ".",
        "",
    ]
    accs = sorted(next(iter(summary.values())))
    for acc in accs:
        val_head = ("val SSIM | ", "---|") if val_summary else ("", "")
        lines += [
            f"## {acc}x (centre fraction {ACCELERATIONS[acc]})",
            "",
            f"| method | trainable params | {val_head[0]}SSIM ↑ | PSNR (dB) ↑ | NMSE (×10⁻²) ↓ |",
            f"|---|---|{val_head[1]}---|---|---|",
        ]
        for m, per_acc in summary.items():
            s = per_acc[acc]
            val = f"{val_summary[m][acc]['ssim'][0]:.4f} | " if val_summary else ""
            lines.append(
                f"| {m} | {params[m]:,} | {val}{s['ssim'][0]:.4f} ± {s['ssim'][1]:.4f} | "
                f"{s['psnr'][0]:.2f} ± {s['psnr'][1]:.2f} | "
                f"{100 * s['nmse'][0]:.3f} ± {100 * s['nmse'][1]:.3f} |"
            )
        lines.append("")
    for acc, stats in (gates or {}).items():
        lines += [
            f"## Gates and Trigger on the MRI sequence, {acc}x (frozen backbones, one middle slice per test "
            "volume)",
            "",
            "t: the Updater's gate of eq. (8), mean at the k-space tokens / image queries; |p-1|: how far "
            "the Trigger moved p from p^0 = 1; std(p): how much p differs between slices at the image "
            "queries (input dependence). Backbones without gates (transformer) are left out; '-': no "
            "Trigger.",
            "",
            "| backbone | layer | t k-space | t queries | abs(p-1) k-space | abs(p-1) queries "
            "| std(p) over slices |",
            "|---|---|---|---|---|---|---|",
        ]
        fmt = lambda values, i: "-" if values is None else f"{values[i]:.4f}"
        for name, st in stats.items():
            for i in range(len(st["gate_kspace"])):
                lines.append(
                    f"| {name} | {i} | {st['gate_kspace'][i]:.4f} | {st['gate_queries'][i]:.4f} | "
                    f"{fmt(st.get('p_shift_kspace'), i)} | {fmt(st.get('p_shift_queries'), i)} | "
                    f"{fmt(st.get('p_slice_std_queries'), i)} |"
                )
        lines.append("")
    return "\n".join(lines)


def reports_markdown(report_scores, report_examples):
    """The generated reports beside their templated truth, with the score of each backbone and
    acceleration."""
    lines = [
        "# Generated reports vs templated truth",
        "",
        "Score: lesion count exact, set of lesion places exact, whole report exact (test slices).",
        "",
    ]
    for (name, acc), s in report_scores.items():
        lines += [
            f"## {name}, {acc}x: count {s['count_acc']:.3f}, place {s['place_acc']:.3f}, "
            f"exact {s['exact']:.3f} (n={s['n']})",
            "",
            "| generated | truth |",
            "|---|---|",
        ]
        lines += [f"| {g!r} | {t!r} |" for g, t in report_examples[(name, acc)]] + [""]
    return "\n".join(lines)
