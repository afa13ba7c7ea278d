"""Speed of the Triton kernels next to their PyTorch references and their peers, on one CUDA GPU.

    python bench.py                                   # every section
    python bench.py --only swa,trigger --out bench_out
    python bench.py --only delta --batch 2

Sections:
  swa      sliding-window attention (kernels) vs nirvana.sliding_window_attention (SDPA with a window mask),
           FlexAttention with a sliding-window block mask (compiled) and SDPA full causal attention (flash);
           B=4, H=16, D=128, bf16, window 2048, T=4096 and T=16384; forward and forward+backward.
  trigger  the fused Trigger step vs nirvana.trigger_step (autograd, create_graph), N=16384 tokens, d_t=K=64: as
           the model calls it under bf16 autocast (q~, k~, v~ bf16; p, eta and the bank float32) and in float32.
  delta    kernels.gated_delta_rule vs nirvana.gated_delta_rule_chunked and, when the fla-core package is
           importable, fla's chunk_gated_delta_rule (its backward refuses Triton < 3.7.1 on Hopper because the
           compiler gave wrong results there; the check is bypassed to time it, said in the output, and the
           error of every contender's output and gradients against the torch reference is in the table);
           forward+backward also as GPU time, the sum of the kernels' times without the host's launch gaps.
  model    one Nirvana block (1.3b layer size) forward+backward with torch ops, all Triton ops, and Triton
           SWA + Trigger with torch's gated delta rule; the fused Trigger step's share of the block's time.
  step     one whole training step (forward+backward) of a preset (--step-preset, default nirvana-350m) with
           backend="triton" vs backend="torch" on the same weights and batch: speed-up and the two losses.
  train    training throughput of same-size presets (--train-presets, default nirvana-350m, gated-deltanet-350m,
           transformer-350m) as train.py trains them: backend triton, bf16 autocast, forward + backward + gradient
           clipping + AdamW on one micro-batch (--train-shape, default 4,4096), eager, torch.compile'd and
           (--train-modes graphed) replayed from one CUDA graph of the whole step (train.py --cuda-graph):
           tokens/s, MFU (train.py's FLOP count), peak memory; beside the first gated-deltanet preset, fla's
           GatedDeltaNetForCausalLM of the same architecture in the same loop when flash-linear-attention is
           importable (--no-fla-peer leaves it out); tokens/s and peak memory relative to fla's model.
  profile  where the time and the memory go, per component (module class, or owner.name for a Linear): one
           training step of --profile-presets (default gated-deltanet-350m, nirvana-350m) and fla's model,
           GPU kernel time forward / backward (charged to the module whose forward op made the autograd node)
           / clipping / optimizer, kernel launches, bytes saved for backward; and one eager decode step of
           each preset after a 4096-token prompt (batch --batch), with the decode kernels and with their
           plain twins (rows Trigger, Attention, GatedDeltaNet, ...: each component's share of the step).
           Tables on stdout and in profile.txt under --out.
  decode   the paper's Table 4 at each --decode-sizes size (default 350m,1.3b; random weights, bf16, CUDA-graph
           replays of the decode step, eval.decode_speed): generated tokens/s at prompt 4096, batch 4, 128 new
           tokens for the six variants (the transformer with its KV cache), with the decode kernels
           (kernels/decode.py: delta-rule step, ring-buffer attention; kernels/trigger_decode.py: the Trigger),
           the same step under torch.compile (eval.py speed --compile: inductor fuses the elementwise work
           between the kernels) and with the kernels' plain twins; kernels and compiled in --decode-passes
           passes (default 2: the models built in the listed order, then in reverse); ratios to
           gated-deltanet and the transformer (pass means), the Trigger's share of nirvana's step (from
           nirvana-notrigger); then ms per token at batch 1 after contexts of 4k, 16k and 64k (section
           'latency'). The floor of these rows is one read of the bf16 weights and of the caches (the SWA
           ring buffers, delta-rule states, KV cache). `python eval.py speed` draws the ms/token-vs-context
           curve as a PNG.
Every row has the floor: max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth), both
measured at the start of the run. Times are medians of triton.testing.do_bench on random non-zero data.
Results: a table on stdout, and bench.json + bench.csv under --out.
"""

import argparse
import csv
import functools
import json
import os
import sys
from pathlib import Path

import torch

from cli import comma_separated, names_from

SECTIONS = ("swa", "trigger", "delta", "model", "step", "train", "decode", "profile")


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.csv")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--seq-lens", default="4096,16384", help="T values for the SWA section")
    parser.add_argument("--step-preset", default="nirvana-350m", help="preset of the step section")
    parser.add_argument("--step-shape", default="2,2048", help="batch,tokens of the step section")
    parser.add_argument(
        "--train-presets",
        default="nirvana-350m,gated-deltanet-350m,transformer-350m",
        help="presets of the train section; ratios are to the first",
    )
    parser.add_argument("--train-shape", default="4,4096", help="micro-batch,tokens of the train section")
    parser.add_argument(
        "--train-modes",
        type=names_from(("eager", "compiled", "graphed"), "training modes"),
        default="eager,compiled",
        help="eager, compiled (torch.compile) and/or graphed (one CUDA graph per step, train.py --cuda-graph)",
    )
    parser.add_argument(
        "--fla-peer",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="time fla's GatedDeltaNetForCausalLM in the train section when fla is importable",
    )
    parser.add_argument(
        "--profile-presets",
        default="gated-deltanet-350m,nirvana-350m",
        help="presets of the profile section (training step at --train-shape, decode step)",
    )
    parser.add_argument(
        "--decode-passes",
        type=int,
        default=2,
        help="passes over the decode variants, in the listed order and then in reverse (the summary's mean)",
    )
    parser.add_argument(
        "--decode-sizes",
        type=lambda text: [size for size in text.split(",") if size],
        default="350m,1.3b",
        help="comma-separated preset sizes of the decode section",
    )
    args = parser.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.decode_passes < 1:
        parser.error(f"--decode-passes must be at least 1, got {args.decode_passes}")
    return args


# ------------------------------------------------------------------------------------------------------
# Timing and the two ceilings


def bench_ms(fn, grad_to_none=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")


def measure_ceilings():
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate (FLOP/s), measured here."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / (copy_ms * 1e-3)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench_ms(lambda: a @ b)
    flops = 2 * 8192**3 / (mm_ms * 1e-3)
    return bandwidth, flops


class Table:
    def __init__(self, bandwidth, flops):
        self.bandwidth, self.flops, self.rows = bandwidth, flops, []

    def add(self, section, case, impl, mode, ms, flop=None, nbytes=None, error=None, note=""):
        floor = max(flop / self.flops if flop else 0.0, nbytes / self.bandwidth if nbytes else 0.0) * 1e3
        row = dict(
            section=section,
            case=case,
            impl=impl,
            mode=mode,
            ms=ms,
            floor_ms=floor or None,
            tflops=(flop / (ms * 1e-3) / 1e12) if flop and ms else None,
            rel_error=error,
            note=note,
        )
        self.rows.append(row)
        print(self.format(row), flush=True)

    @staticmethod
    def header():
        return (
            f"{'section':8} {'case':26} {'impl':22} {'mode':11} {'ms':>9} {'floor ms':>9} {'TFLOP/s':>8} "
            f"{'rel.err':>8}  note"
        )

    @staticmethod
    def format(r):
        num = lambda x, f: format(x, f) if isinstance(x, (int, float)) else "-"
        return (
            f"{r['section']:8} {r['case']:26} {r['impl']:22} {r['mode']:11} {num(r['ms'], '9.3f')} "
            f"{num(r['floor_ms'], '9.3f')} {num(r['tflops'], '8.1f')} {num(r['rel_error'], '8.1e')}  {r['note']}"
        )

    def ratios(self):
        """Each row's time over the reference's and the best peer's of the same section, case and mode."""
        lines = []
        groups = {}
        for r in self.rows:
            groups.setdefault((r["section"], r["case"], r["mode"]), []).append(r)
        for (section, case, mode), rows in groups.items():
            kernel = next((r for r in rows if r["impl"] == "triton kernel" and r["ms"]), None)
            if kernel is None:
                continue
            for other in rows:
                if other is not kernel and other["ms"]:
                    lines.append(
                        f"{section:8} {case:26} {mode:11} kernel / {other['impl']:22} = "
                        f"{kernel['ms'] / other['ms']:6.3f}"
                    )
        return lines

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        meta = dict(
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            bandwidth_GBps=self.bandwidth / 1e9,
            bf16_matmul_TFLOPs=self.flops / 1e12,
        )
        from cli import write_atomically

        text = json.dumps(dict(meta=meta, rows=self.rows), indent=1)
        write_atomically(os.path.join(folder, "bench.json"), lambda tmp: Path(tmp).write_text(text))
        write_atomically(os.path.join(folder, "bench.csv"), lambda tmp: self.write_csv(tmp))

    def write_csv(self, path):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]) if self.rows else ["section"])
            writer.writeheader()
            writer.writerows(self.rows)


def rel_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def time_or_note(fn, grad_to_none=None):
    """(ms, note): a contender that runs out of memory is reported, not fatal."""
    try:
        return bench_ms(fn, grad_to_none), ""
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"


def gpu_kernel_ms(fn, grad_to_none=None, calls=20):
    """GPU time of one call of fn: the sum of its CUDA kernels' times (torch.profiler, mean over `calls` calls).
    do_bench's time is the wall time between two events and also counts the gaps in which the GPU waits for the
    host to launch the next kernel; this one does not."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        for x in grad_to_none or []:
            x.grad = None
        fn()

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / calls / 1e3


def forward_and_backward(fn, inputs, grad_out):
    def step():
        out = fn(*inputs)
        out.backward(grad_out)

    return step


# ------------------------------------------------------------------------------------------------------
# Sections


def bench_swa(table, args):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import kernels
    import nirvana

    flex = torch.compile(flex_attention)
    B, H, D, W = args.batch, args.heads, args.head_dim, args.window
    for T in [int(t) for t in args.seq_lens.split(",")]:
        case = f"B{B} T{T} H{H} D{D} W{W}"
        q, k, v = (
            torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        grad_out = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        # (B, H, T, D)
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        grad_out_h = grad_out.transpose(1, 2).contiguous()

        def window_mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

        block_mask = create_block_mask(window_mask, None, None, T, T, device="cuda")
        pairs = sum(min(i + 1, W) for i in range(T))  # visible (query, key) pairs
        causal_pairs = T * (T + 1) // 2
        io = 4 * B * T * H * D * 2  # q, k, v, o in bf16
        sdpa = torch.nn.functional.scaled_dot_product_attention
        contenders = [  # name, function, inputs, output gradient, visible (query, key) pairs
            (
                "triton kernel",
                lambda q, k, v: kernels.sliding_window_attention(q, k, v, W),
                (q, k, v),
                grad_out,
                pairs,
            ),
            (
                "torch reference",
                lambda q, k, v: nirvana.sliding_window_attention(q, k, v, W),
                (q, k, v),
                grad_out,
                pairs,
            ),
            (
                "flex_attention SWA",
                lambda q, k, v: flex(q, k, v, block_mask=block_mask),
                (qh, kh, vh),
                grad_out_h,
                pairs,
            ),
            (
                "sdpa full causal",
                lambda q, k, v: sdpa(q, k, v, is_causal=True),
                (qh, kh, vh),
                grad_out_h,
                causal_pairs,
            ),
        ]
        with torch.no_grad():
            expected = nirvana.sliding_window_attention(q, k, v, W) if T <= 4096 else None
        for name, fn, inputs, g, n_pairs in contenders:
            with torch.no_grad():
                try:
                    out = fn(*inputs)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    table.add("swa", case, name, "fwd", None, note="out of memory")
                    continue
            error = None
            if expected is not None and name != "sdpa full causal":
                error = rel_error(out.transpose(1, 2) if out.shape != expected.shape else out, expected)
            del out
            with torch.no_grad():
                ms, note = time_or_note(lambda: fn(*inputs))
            table.add("swa", case, name, "fwd", ms, 4 * n_pairs * D * B * H, io, error, note)
            ms, note = time_or_note(forward_and_backward(fn, inputs, g), grad_to_none=list(inputs))
            table.add("swa", case, name, "fwd+bwd", ms, 14 * n_pairs * D * B * H, 2.5 * io, None, note)
        del q, k, v, qh, kh, vh, expected
        torch.cuda.empty_cache()


def trigger_inputs(N, D, K, dtype):
    """q~, k~, v~ in dtype; p, eta and the bank float32 (as the model passes them)."""
    q, k, v = (torch.randn(N, D, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    p = (1 + 0.3 * torch.randn(N, K, device="cuda")).requires_grad_()
    eta = (0.1 * torch.rand(N, device="cuda")).requires_grad_()
    bank_weight = (torch.randn(K, D, D, device="cuda") / (K * D) ** 0.5).requires_grad_()
    bank_bias = (torch.randn(K, D, device="cuda") / (K * D) ** 0.5).requires_grad_()
    return [q, k, v, p, eta, bank_weight, bank_bias]


def trigger_cost(N, D, K, dtype):
    """FLOPs and bytes of the fused step: forward 3 passes of N x D x D products per bank block, backward 5
    plus the bank gradient (2); bytes: inputs and outputs once (q~, k~, v~, c in dtype, the rest float32)."""
    unit = 2 * N * D * D * K
    size = torch.finfo(dtype).bits // 8
    io_fwd = size * 4 * N * D + 4 * (2 * N * K + N + K * D * D)
    return dict(fwd=(2 * unit, io_fwd), bwd=(9 * unit, 3 * io_fwd))


def bench_trigger(table, args, N=None, section="trigger"):
    """Both dtype cases; returns {impl: fwd+bwd ms} of the bf16 case (the model's under autocast)."""
    import kernels
    import nirvana

    N = N or args.batch * 4096
    D = K = 64
    model_case_times = {}
    for dtype, label in ((torch.bfloat16, "bf16 q~k~v~"), (torch.float32, "fp32")):
        case = f"N{N} d_t{D} K{K} {label}"
        inputs = trigger_inputs(N, D, K, dtype)
        with torch.no_grad():
            c, p = kernels.trigger_step(*inputs)
        c_ref, p_ref = nirvana.trigger_step(*[x.detach().float() for x in inputs])  # float32 reference
        error = max(rel_error(c, c_ref), rel_error(p, p_ref))
        cost = trigger_cost(N, D, K, dtype)
        for name, fn in (("triton kernel", kernels.trigger_step), ("torch reference", nirvana.trigger_step)):
            with torch.no_grad():
                ms, note = time_or_note(lambda: fn(*inputs))
            table.add(
                section, case, name, "fwd", ms, *cost["fwd"], error if name == "triton kernel" else None, note
            )

            def step(fn=fn):
                c, p = fn(*inputs)
                torch.autograd.backward([c, p], [torch.ones_like(c), torch.ones_like(p)])

            ms, note = time_or_note(step, grad_to_none=inputs)
            if dtype == torch.bfloat16:
                model_case_times[name] = ms
            flop = cost["fwd"][0] + cost["bwd"][0]
            table.add(section, case, name, "fwd+bwd", ms, flop, cost["fwd"][1] + cost["bwd"][1], None, note)
    return model_case_times


def fla_chunk_gated_delta_rule():
    """fla's chunk_gated_delta_rule, or None when fla-core is not installed (it is not a dependency)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    bypass_fla_hopper_check()
    return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)


def bypass_fla_hopper_check():
    """fla's backward refuses Triton < 3.7.1 on Hopper (it reports wrong gated dq/dk/dw there); to time it,
    the check is switched off, said once on stdout (the delta section's table gives its gradient error)."""
    import fla.ops.common.chunk_o as fla_chunk_o
    import triton

    if not getattr(fla_chunk_o, "TRITON_ABOVE_3_7_1", True):
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
        print(
            f"fla's backward refuses Triton {triton.__version__} on Hopper (wrong results reported by fla); "
            "its check is bypassed here to time it - see its gradient error in the delta section"
        )


def bench_delta(table, args):
    import nirvana
    from kernels.gated_delta_rule import gated_delta_rule

    B, H, D, T = args.batch, args.heads, args.head_dim, 4096
    case = f"B{B} T{T} H{H} D{D}"
    q, k = (
        torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1)
        .bfloat16()
        .requires_grad_()
        for _ in range(2)
    )
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = (-torch.rand(B, T, H, device="cuda") * 0.1).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda").requires_grad_()
    grad_out = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    inputs = [q, k, v, g, beta]

    def output_and_grads(fn):
        out = fn(*inputs)[0]
        grads = torch.autograd.grad(out, inputs, grad_out)
        return out.detach(), grads

    expected, expected_grads = output_and_grads(nirvana.gated_delta_rule_chunked)
    contenders = {"triton kernel": gated_delta_rule, "torch reference": nirvana.gated_delta_rule_chunked}
    fla = fla_chunk_gated_delta_rule()
    if fla is not None:
        contenders["fla chunk_gated_delta_rule"] = fla
    chunk = 64
    # chunked form: per chunk of C tokens about 6 C^2 D + 6 C D^2 multiply-adds per head (WY form)
    flop = 2 * B * H * (T // chunk) * (6 * chunk**2 * D + 6 * chunk * D**2)
    io = (3 * B * T * H * D * 2) + B * T * H * D * 2
    for name, fn in contenders.items():
        errors = (None, None)
        if name != "torch reference":
            out, grads = output_and_grads(fn)
            errors = (rel_error(out, expected), max(rel_error(a, b) for a, b in zip(grads, expected_grads)))
        with torch.no_grad():
            ms, note = time_or_note(lambda: fn(*inputs))
        table.add("delta", case, name, "fwd", ms, flop, io, errors[0], note)
        step = forward_and_backward(lambda *x: fn(*x)[0], inputs, grad_out)
        ms, note = time_or_note(step, grad_to_none=inputs)
        table.add("delta", case, name, "fwd+bwd", ms, 3 * flop, 2.5 * io, errors[1], note)
        if ms is not None and name != "torch reference":
            table.add(
                "delta",
                case,
                name,
                "fwd+bwd GPU",
                gpu_kernel_ms(step, grad_to_none=inputs),
                3 * flop,
                2.5 * io,
                note="sum of its GPU kernels' times (torch.profiler), without the host's launch gaps",
            )


def bench_model(table, args):
    """One Nirvana block of the 1.3b preset (d_model 2048, 16 heads of 128, window 2048), bf16 autocast,
    with the torch ops, all Triton ops, and the Triton SWA + Trigger beside torch's gated delta rule."""
    import kernels
    import nirvana

    B, T = args.batch, 4096
    case = f"1.3b block B{B} T{T}"
    config = nirvana.NirvanaConfig.from_preset("nirvana-1.3b", n_layers=3, n_prelude=2)
    h = torch.randn(B, T, config.d_model, device="cuda", requires_grad=True)
    op_sets = dict(
        torch=nirvana.load_backend("torch"),
        triton=nirvana.load_backend("triton"),
        swa_trigger=nirvana.with_ops(
            nirvana.TORCH_OPS,
            sliding_window_attention=kernels.sliding_window_attention,
            trigger_step=kernels.trigger_step,
        ),
    )
    times = {}
    for name, ops in op_sets.items():
        torch.manual_seed(0)
        block = nirvana.Block(config, config.n_prelude, ops).cuda()
        bank = nirvana.TriggerBank(config).cuda()
        p = torch.ones(B, T, config.bank_size, device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, p_new, _ = block(h, p=p, bank=bank)
            (out.float().square().mean() + p_new.mean()).backward()

        try:
            ms, note = time_or_note(step, grad_to_none=[h, *block.parameters(), *bank.parameters()])
        except Exception as error:  # e.g. a kernel that rejects what the model passes: report, go on
            ms, note = None, f"failed: {error!r}"[:160]
        times[name] = ms
        table.add("model", case, f"block ({name} ops)", "fwd+bwd", ms, note=note)
        block = bank = None  # freed before the next ops' block
        torch.cuda.empty_cache()
    trigger_times = bench_trigger(table, args, N=B * T, section="model")
    for name in ("triton", "swa_trigger"):
        if times.get(name) and trigger_times.get("triton kernel"):
            share = trigger_times["triton kernel"] / times[name]
            print(f"model: fused Trigger fwd+bwd = {share:.1%} of the block's fwd+bwd with {name} ops")
    if times.get("torch") and trigger_times.get("torch reference"):
        share = trigger_times["torch reference"] / times["torch"]
        print(f"model: reference Trigger fwd+bwd = {share:.1%} of the block's fwd+bwd with torch ops")


def bench_step(table, args):
    """A whole training step of one preset, backend="triton" vs "torch": same weights, same batch."""
    import nirvana

    B, T = (int(x) for x in args.step_shape.split(","))
    case = f"{args.step_preset} B{B} T{T}"
    idx = torch.randint(0, 32000, (B, T), device="cuda")
    losses, times = {}, {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset(args.step_preset, backend=backend)).cuda()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx, idx)[1]
            loss.backward()
            return loss

        losses[backend] = step().item()
        times[backend], note = time_or_note(step, grad_to_none=list(model.parameters()))
        table.add("step", case, f"model (backend {backend})", "fwd+bwd", times[backend], note=note)
        model = None  # freed before the next backend's model
        torch.cuda.empty_cache()
    print(
        f"step: {case} loss with backend triton {losses['triton']:.6f}, torch {losses['torch']:.6f} "
        f"(relative difference {abs(losses['triton'] - losses['torch']) / losses['torch']:.2e})"
    )
    if times["triton"] and times["torch"]:
        print(f"step: backend triton is {times['torch'] / times['triton']:.2f}x as fast as backend torch")


def time_training_steps(step, warmup=3, steps=10):
    """Median ms of `steps` calls of step() after `warmup` calls, and the seconds the warm-up calls took (the
    first compiles the Triton kernels: minutes on a fresh machine, seconds from Triton's cache)."""
    import statistics
    import time

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), warmup_s


def fla_gated_deltanet_model(config):
    """fla's GatedDeltaNetForCausalLM with the architecture of a gated-deltanet NirvanaConfig (hidden size,
    layers, heads x head size, expand_v, SwiGLU size, conv size, untied embeddings: the same parameter count),
    or None when flash-linear-attention is not importable (it is not a dependency). fla's own defaults stay:
    its fused norms, SwiGLU and cross-entropy. Its backward refuses Triton < 3.7.1 on Hopper; the check is
    bypassed as in the delta section."""
    try:
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    except ImportError:
        return None
    bypass_fla_hopper_check()
    fla_config = GatedDeltaNetConfig(
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_heads=config.n_heads,
        head_dim=config.head_dim,
        expand_v=config.expand_v,
        intermediate_size=config.ffn_hidden,
        conv_size=config.conv_size,
        norm_eps=config.norm_eps,
        vocab_size=config.vocab_size,
        tie_word_embeddings=False,
        initializer_range=config.init_std,
    )
    return GatedDeltaNetForCausalLM(fla_config)


class FlaAsNirvana(torch.nn.Module):
    """fla's causal LM called like ours: model(idx, targets) -> (logits, loss). fla shifts the labels by one
    itself (HF convention), so the loss is over T - 1 positions; the work per step is the same."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets=None):
        out = self.model(input_ids=idx, labels=targets)
        return out.logits, out.loss


def train_contenders(presets, fla_peer):
    """(name, NirvanaConfig for the FLOP count, model builder) of each preset, with fla's model of the first
    gated-deltanet preset's configuration ahead of them when fla_peer and fla is importable (the reference
    of the ratios comes first, so a run cut short still has it)."""
    import nirvana

    contenders = []
    for preset in presets:
        config = nirvana.NirvanaConfig.from_preset(preset, backend="triton")
        contenders.append((preset, config, lambda config=config: nirvana.Nirvana(config)))
    peer = next((c for name, c, _ in contenders if c.variant == "gated-deltanet"), None)
    if fla_peer and peer is not None:
        if fla_gated_deltanet_model(nirvana.NirvanaConfig.from_preset("gated-deltanet-tiny")) is None:
            print(
                "train: flash-linear-attention is not importable; fla's GatedDeltaNetForCausalLM is left out"
            )
        else:
            name = f"fla GatedDeltaNetForCausalLM ({peer.d_model}x{peer.n_layers})"
            contenders.insert(0, (name, peer, lambda: FlaAsNirvana(fla_gated_deltanet_model(peer))))
    return contenders


def training_step(model, forward, optimizer, idx, grad_clip):
    """train.py's step on one micro-batch: bf16 autocast over float32 weights, backward, clipping, AdamW."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(idx, idx)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(table, args):
    """Tokens/s of one training step per preset and mode, as train.py runs it (its optimizer and FLOP count),
    with fla's Gated DeltaNet model as the peer: every contender in the same loop, ratios from one run."""
    import train

    B, T = (int(x) for x in args.train_shape.split(","))
    presets = comma_separated(args.train_presets)
    modes = args.train_modes
    idx = torch.randint(0, 32000, (B, T), device="cuda")
    peak = train.peak_flops(torch.device("cuda"))
    run_args = train.parse_args(["--preset", presets[0]])  # train.py's defaults: AdamW settings, clipping
    reference = None  # (name, tokens/s, peak GiB) of fla's model in the first mode that timed it
    for mode in modes:
        results = {}  # name -> (tokens/s, peak GiB)
        for name, config, build in train_contenders(presets, args.fla_peer):
            if mode == "graphed" and name.startswith("fla "):
                # a failed capture can leave the CUDA context unusable for the contenders after it
                print(f"train (graphed): {name} is not captured; its ratios are to its {modes[0]} step")
                continue
            # progress: a contender's warm-up steps can take minutes on a fresh machine (Triton compiles our kernels,
            # fla autotunes its own); the note gives how long they took
            print(f"train ({mode}): timing {name}", flush=True)
            torch.manual_seed(0)
            torch._dynamo.reset()  # each contender compiles afresh
            model = build().cuda()
            forward = torch.compile(model) if mode == "compiled" else model
            optimizer = train.build_optimizer(run_args, model)
            params = sum(p.numel() for p in model.parameters())
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            flop = step = None
            # fla's layer forward is a frame of its own (graph breaks around it) that dynamo specialises on the
            # layer's integer layer_idx: one compile per layer, past dynamo's default limit of 8, after which
            # the remaining layers ran eager. The limit is raised to cover every layer of the contender.
            recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * config.n_layers)
            try:
                if mode == "graphed":
                    graph_step = train.CudaGraphTrainStep(model, optimizer, 1, B, T, run_args.grad_clip)
                    step = functools.partial(graph_step, [(idx, idx)], run_args.lr)
                else:
                    step = training_step(model, forward, optimizer, idx, run_args.grad_clip)
                with torch._dynamo.config.patch(recompile_limit=recompile_limit):
                    ms, warmup_s = time_training_steps(step)
                tokens_per_s = B * T / (ms * 1e-3)
                peak_gib = torch.cuda.max_memory_allocated() / 2**30
                results[name] = (tokens_per_s, peak_gib)
                flop = train.flops_per_token(config, meta_model(config), T) * B * T  # the peer's: its twin's
                mfu = flop / (ms * 1e-3) / peak if peak and flop else None
                note = (
                    f"{tokens_per_s:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, "
                    f"peak memory {peak_gib:.1f} GiB, {params:,} params, warm-up {warmup_s:.0f} s"
                )
            except torch.OutOfMemoryError:
                ms, note = None, "out of memory"
            except Exception as error:  # e.g. torch.compile failing on a peer: report it, time the others
                ms, note = None, f"failed: {error!r}"[:160]
            table.add("train", f"{name} B{B} T{T}", f"step ({mode})", "step", ms, flop, note=note)
            del model, forward, optimizer, step
            torch.cuda.empty_cache()
        if reference is None:
            reference = next(
                ((f"{name} ({mode})", *results[name]) for name in results if name.startswith("fla ")), None
            )
        print_train_ratios(mode, results, reference)


def meta_model(config):
    """A NirvanaConfig's model on the meta device (nothing allocated): for its parameter and FLOP counts."""
    import nirvana

    with torch.device("meta"):
        return nirvana.Nirvana(config)


def print_train_ratios(mode, results, reference):
    """tokens/s and peak memory of every contender relative to reference (name, tokens/s, peak GiB): fla's
    model, from this mode or an earlier one of the same run; without it, to the first contender."""
    if not results:
        return
    if reference is None:
        reference = (next(iter(results)), *next(iter(results.values())))
    reference, ref_tokens, ref_peak = reference
    print(f"train ({mode}): ratios to {reference}")
    print(f"  {'model':48} {'tokens/s':>10} {'ratio':>6} {'peak GiB':>9} {'ratio':>6}")
    for name, (tokens_per_s, peak_gib) in results.items():
        print(
            f"  {name:48} {tokens_per_s:10,.0f} {tokens_per_s / ref_tokens:6.2f} {peak_gib:9.1f} "
            f"{peak_gib / ref_peak:6.2f}"
        )


# ------------------------------------------------------------------------------------------------------
# Profile: where one training step's and one decode step's GPU time and activation memory go, per component


def component_label(name, module, modules):
    """The row a module's work lands in: its class; for a Linear, its owner's class and its path from there
    (NirvanaMixer.q_proj, Trigger.q_proj, Updater.zeta.0), containers skipped."""
    if not isinstance(module, torch.nn.Linear):
        return type(module).__name__
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = modules[".".join(parts[:cut])]
        if not isinstance(owner, (torch.nn.Sequential, torch.nn.ModuleList)):
            return f"{type(owner).__name__}.{'.'.join(parts[cut:])}"
    return name


class ComponentProfile:
    """Names each module's share of the work. Forward hooks open a torch.profiler range per module call
    ("component: <label>", innermost wins) and count the bytes each component saves for backward (storages
    of saved tensors, each once, parameters excluded). Backward kernels are charged to the component whose
    forward op created their autograd node (the profiler gives both the same sequence number)."""

    PREFIX = "component: "

    def __init__(self, model, top_label="model (embedding, lm head, loss, glue)"):
        self.stack, self.saved, self.seen_storages, self.handles = [], {}, set(), []
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        modules = dict(model.named_modules())
        for name, module in modules.items():
            label = top_label if module is model else component_label(name, module, modules)
            self.handles.append(module.register_forward_pre_hook(lambda m, a, label=label: self.enter(label)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self.exit(), always_call=True))

    def enter(self, label):
        self.stack.append((label, torch.ops.profiler._record_function_enter_new(self.PREFIX + label)))

    def exit(self):
        torch.ops.profiler._record_function_exit(self.stack.pop()[1])

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if self.stack and key not in self.seen_storages and key not in self.parameter_storages:
            self.seen_storages.add(key)
            label = self.stack[-1][0]
            self.saved[label] = self.saved.get(label, 0) + storage.nbytes()
        return tensor

    def saving(self):
        """Context manager: count the tensors autograd saves for backward while it is open."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def phase(name):
    return torch.profiler.record_function("phase: " + name)


def attribute_time(events, use_device):
    """{(phase, component): microseconds} and {(phase, component): kernel launches} from profiler events.

    With use_device, every device kernel is charged once, through the CPU op the profiler links it to: to the
    innermost component range around that op; an op outside every component (the backward, on the autograd
    thread) to the component whose forward op has its autograd node's sequence number, else "other". A kernel
    linked to no CPU op (the profiler does not link Triton's own launches: the decode kernels, for one) goes to
    the innermost component range around it on the device's timeline. Without use_device, each CPU op's own
    CPU time is charged the same way."""
    from torch.autograd import DeviceType

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    phases = sorted(
        (e.time_range.start, e.time_range.end, e.name[len("phase: ") :])
        for e in cpu_events
        if e.name.startswith("phase: ")
    )

    def phase_of(event, ranges=phases):
        start = event.time_range.start
        return next((name for begin, end, name in ranges if begin <= start <= end), None)

    def component_of(event):
        while event is not None:
            if event.name.startswith(ComponentProfile.PREFIX):
                return event.name[len(ComponentProfile.PREFIX) :]
            event = event.cpu_parent
        return None

    forward_component = {}
    for event in cpu_events:
        if event.sequence_nr >= 0 and phase_of(event) in ("forward", "decode step"):
            component = component_of(event)
            if component is not None:
                forward_component.setdefault(event.sequence_nr, component)

    def backward_component_of(event):
        while event is not None:
            if (
                event.sequence_nr >= 0
                and not event.name.startswith("aten::")
                and event.sequence_nr in forward_component
            ):
                return forward_component[event.sequence_nr]
            event = event.cpu_parent
        return "other"

    times, launches = {}, {}

    def charge(step_phase, component, cost):
        key = (step_phase, component)
        times[key] = times.get(key, 0.0) + cost
        launches[key] = launches.get(key, 0) + 1

    if not use_device:
        for event in cpu_events:
            step_phase = phase_of(event)
            if event.name.startswith(("phase: ", ComponentProfile.PREFIX)) or step_phase is None:
                continue  # a range's own CPU time is the Python around the ops: not charged
            if event.self_cpu_time_total:
                component = component_of(event) or (
                    backward_component_of(event) if step_phase == "backward" else "other"
                )
                charge(step_phase, component, event.self_cpu_time_total)
        return times, launches

    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    is_range = [
        e.name.startswith(("phase: ", ComponentProfile.PREFIX)) or getattr(e, "is_user_annotation", False)
        for e in device_events
    ]
    ranges = [e for e, annotation in zip(device_events, is_range) if annotation]
    device_phases = sorted(
        (e.time_range.start, e.time_range.end, e.name[len("phase: ") :])
        for e in ranges
        if e.name.startswith("phase: ")
    )
    device_components = [
        (e.time_range.end - e.time_range.start, e.time_range.start, e.time_range.end, e.name)
        for e in ranges
        if e.name.startswith(ComponentProfile.PREFIX)
    ]
    device_components.sort()  # the innermost (shortest) range first
    # the ops kernels are linked to: CPU events not themselves linked to another (launch calls are)
    ops = {e.id: e for e in cpu_events if not e.is_async and not getattr(e, "linked_correlation_id", 0)}
    for kernel in (e for e, annotation in zip(device_events, is_range) if not annotation):
        linked = getattr(kernel, "linked_correlation_id", 0)
        op = ops.get(linked) if linked else None
        if op is not None:
            step_phase, component = phase_of(op), component_of(op)
        else:
            step_phase = phase_of(kernel, device_phases)
            component = next(
                (
                    name[len(ComponentProfile.PREFIX) :]
                    for _, begin, end, name in device_components
                    if begin <= kernel.time_range.start and kernel.time_range.end <= end
                ),
                None,
            )
        if step_phase is None:
            continue
        if component is None:
            component = backward_component_of(op) if step_phase == "backward" else "other"
        charge(step_phase, component, kernel.time_range.end - kernel.time_range.start)
    return times, launches


def profile_table(title, times, launches, saved=None, steps=1, top=None):
    """Lines of a table: component, time per step per phase, its share, launches, bytes saved for backward."""
    phases = sorted(
        {p for p, _ in times}, key=["forward", "backward", "clip", "optimizer", "decode step"].index
    )
    components = {}
    for (p, component), us in times.items():
        components.setdefault(component, {})[p] = us / steps
    total = sum(times.values()) / steps
    rows = sorted(components.items(), key=lambda item: -sum(item[1].values()))[:top]
    header = (
        f"{'component':44} "
        + " ".join(f"{p + ' ms':>13}" for p in phases)
        + f" {'share':>6} {'launches':>8}"
        + (f" {'saved GiB':>9}" if saved is not None else "")
    )
    lines = [f"{title}: total {total / 1e3:.2f} ms per step", header]
    for component, per_phase in rows:
        n = sum(v for (_, c), v in launches.items() if c == component) / steps
        line = (
            f"{component[:44]:44} "
            + " ".join(f"{per_phase.get(p, 0) / 1e3:13.3f}" for p in phases)
            + f" {sum(per_phase.values()) / total:6.1%} {n:8.0f}"
        )
        if saved is not None:
            line += f" {saved.get(component, 0) / 2**30:9.3f}"
        lines.append(line)
    return lines


def profile_training_step(name, model, forward, optimizer, idx, grad_clip, use_device=True):
    """One profiled training step (after two unprofiled ones): the table lines, and the memory figures."""
    from torch.profiler import ProfilerActivity, profile

    components = ComponentProfile(model)
    step = training_step(model, forward, optimizer, idx, grad_clip)
    for _ in range(2):
        step()
    synchronize = torch.cuda.synchronize if use_device else (lambda: None)
    synchronize()
    if use_device:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if use_device else 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_device else [])
    with profile(activities=activities) as prof:
        with phase("forward"), components.saving(), torch.autocast(idx.device.type, dtype=torch.bfloat16):
            loss = forward(idx, idx)[1]
        synchronize()
        after_forward = torch.cuda.memory_allocated() if use_device else 0
        with phase("backward"):
            loss.backward()
        with phase("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize()
    components.remove()
    times, launches = attribute_time(prof.events(), use_device)
    lines = profile_table(
        f"profile: training step of {name}, B{idx.shape[0]} T{idx.shape[1]}",
        times,
        launches,
        components.saved,
    )
    memory = dict(
        saved_for_backward=sum(components.saved.values()),
        held_after_forward=after_forward - before,
        peak=torch.cuda.max_memory_allocated() if use_device else 0,
        weights_grads_adam=before,
    )
    lines.append(
        "memory: " + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f} GiB" for k, v in memory.items())
    )
    return lines


def profile_decode_step(name, model, batch_size, prompt_len, steps=8, use_device=True):
    """Eager one-token decode steps after a prefill of prompt_len: GPU kernel time per component per step."""
    from torch.profiler import ProfilerActivity, profile

    import eval as evaluation

    prompt = evaluation.random_prompt(model, batch_size, prompt_len)
    model.setup_caches(batch_size, prompt_len + 4 + steps)
    components = ComponentProfile(model, top_label="model (embedding, lm head)")
    try:
        with torch.no_grad():
            for start in range(0, prompt_len, evaluation.PREFILL_CHUNK):
                logits = model(prompt[:, start : start + evaluation.PREFILL_CHUNK], input_pos=start)[0][:, -1]
            token, position = logits.argmax(-1, keepdim=True), prompt_len
            for _ in range(4):
                token = evaluation.decode_step(model, token, position).argmax(-1, keepdim=True)
                position += 1
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_device else [])
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    with phase("decode step"):
                        token = evaluation.decode_step(model, token, position).argmax(-1, keepdim=True)
                    position += 1
                if use_device:
                    torch.cuda.synchronize()
    finally:
        components.remove()
        model.clear_caches()
    times, launches = attribute_time(prof.events(), use_device)
    return profile_table(
        f"profile: eager decode step of {name}, batch {batch_size}, after a prompt of {prompt_len} "
        + (
            "(GPU kernel time; the CUDA graph replays the same kernels without the host gaps)"
            if use_device
            else "(the ops' own CPU time)"
        ),
        times,
        launches,
        steps=steps,
    )


def bench_profile(table, args):
    """Per-component breakdown of one training step (our gated-deltanet and nirvana presets, fla's model) and
    of one decode step (nirvana and gated-deltanet, with and without the decode kernels); the tables go to
    stdout and profile.txt under --out."""
    import eval as evaluation
    import train

    B, T = (int(x) for x in args.train_shape.split(","))
    idx = torch.randint(0, 32000, (B, T), device="cuda")
    run_args = train.parse_args(["--preset", "gated-deltanet-350m"])
    presets = [p.strip() for p in args.profile_presets.split(",") if p.strip()]
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for name, _, build in train_contenders(presets, args.fla_peer):
        torch.manual_seed(0)
        model = build().cuda()
        optimizer = train.build_optimizer(run_args, model)
        model_lines = profile_training_step(name, model, model, optimizer, idx, run_args.grad_clip)
        print("\n".join(model_lines), flush=True)
        lines += model_lines + [""]
        del model, optimizer
        torch.cuda.empty_cache()
    for preset in presets:
        variant, size = preset.rsplit("-", 1)
        for paths in ("decode kernels", "torch twins"):
            model = evaluation.speed_model(variant, size, "triton", "cuda", torch.bfloat16, 32000)
            if paths == "torch twins":
                with_torch_decode_steps(model)
            model_lines = profile_decode_step(f"{preset} ({paths})", model, args.batch, 4096)
            print("\n".join(model_lines), flush=True)
            lines += model_lines + [""]
            del model
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    from cli import write_text_atomically

    os.makedirs(args.out, exist_ok=True)
    write_text_atomically(os.path.join(args.out, "profile.txt"), text + "\n")


def with_torch_decode_steps(model):
    """The model with its decode paths (kernels/decode.py's one-token steps of the delta rule and attention,
    kernels/causal_conv.py's step, kernels/trigger_decode.py's Trigger step) replaced by their plain twins in
    nirvana.py."""
    import nirvana

    twins = dict(
        gated_delta_rule_step=nirvana.TORCH_OPS.gated_delta_rule_step,
        causal_conv_silu_step=nirvana.TORCH_OPS.causal_conv_silu_step,
        attention_step=nirvana.TORCH_OPS.attention_step,
        trigger_step=nirvana.TORCH_OPS.trigger_step,
    )
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), type(nirvana.TORCH_OPS)):
            module.ops = nirvana.with_ops(module.ops, **twins)
    return model


DECODE_VARIANTS = ("nirvana", "nirvana-notrigger", "nirvana-rope", "gated-deltanet", "hybrid", "transformer")
# the decode kernels as the model runs them, the same step under torch.compile (eval.compiled_decode_step), and
# the kernels' plain twins (first pass only)
DECODE_PATHS = ("decode kernels", "compiled", "torch twins")
LATENCY_CONTEXTS = (4096, 16384, 65536)


def decode_floor_bytes(model, batch_size, cache_len):
    """The bytes one decode step reads at the least: the weights in bf16 but the embedding table (a step
    reads one row of it per sequence), and every cache once (delta-rule states, convolution tails, the SWA
    ring buffers, the transformer's KV cache) as setup_caches(batch_size, cache_len) allocates them. A
    Nirvana layer reads its SWA ring as well as its delta-rule state: its floor is above gated-deltanet's."""
    weights = 2 * (model.num_params() - model.token_embedding.weight.numel())
    before = sum(buffer.nbytes for buffer in model.buffers())
    model.setup_caches(batch_size, cache_len)
    caches = sum(buffer.nbytes for buffer in model.buffers()) - before
    model.clear_caches()
    return weights + caches


def bench_decode(table, args):
    """Table 4 of the paper at each --decode-sizes size: generated tokens/s of the six variants at prompt 4096,
    batch 4, with the triton backend's decode kernels, the same under torch.compile (with its logit error
    against eager decoding and its compile time) and with the kernels' plain twins (the kernels' gain), then
    milliseconds per token at batch 1 after contexts of 4k, 16k and 64k tokens (with the kernels). Each row's
    floor is one read of the weights and the caches (decode_floor_bytes); a summary gives the ratios to
    gated-deltanet and to the transformer (the paper, 1.3b: nirvana 1.12x and 2.7x) and the Trigger's share of
    nirvana's step.

    Repeated runs found the first model built in a process faster than the later ones, so the decode kernels
    and their compiled step are timed in --decode-passes passes over the variants, the models built in the
    listed order in the first pass, in reverse in the second, and so on; the summary takes the mean over
    passes and shows each. The torch twins and the latencies are measured in the first pass. A step whose CUDA
    graph failed eval's check (its replay must give what the step gives run directly) is timed without a graph
    and marked so in the summary."""
    import eval as evaluation

    for size in args.decode_sizes:
        case, tokens_per_s = f"{size} prompt4096 B4", {}  # (variant, path) -> tokens/s of each pass
        ungraphed = set()  # (variant, path) of the runs whose step was not replayed from a CUDA graph
        for attempt in range(args.decode_passes):
            order = DECODE_VARIANTS if attempt % 2 == 0 else DECODE_VARIANTS[::-1]
            for variant in order:
                model = evaluation.speed_model(variant, size, "triton", "cuda", torch.bfloat16, 32000)
                step_bytes = decode_floor_bytes(model, 4, evaluation.check_cache_len(4096, 128))
                paths = DECODE_PATHS if attempt == 0 else DECODE_PATHS[:2]
                for path in paths:
                    if path == "torch twins":
                        with_torch_decode_steps(model)
                    torch._dynamo.reset()  # each model compiles afresh (no cache entries of another variant)
                    compiled = path == "compiled"
                    result = evaluation.decode_speed(
                        model, prompt_len=4096, batch_size=4, new_tokens=128, compile=compiled
                    )
                    tokens_per_s.setdefault((variant, path), []).append(result["decode_tokens_per_s"])
                    if not result["cuda_graph"]:
                        ungraphed.add((variant, path))
                    note = f"{result['decode_tokens_per_s']:.1f} tokens/s, cuda_graph={result['cuda_graph']}"
                    if compiled:
                        note += (
                            f", rel. logit error vs eager {result['compiled_rel_error']:.1e}, "
                            f"{result['setup_s']:.0f} s to compile and check"
                        )
                    table.add(
                        "decode",
                        case,
                        f"{variant}, {path}" + (f", pass {attempt + 1}" if attempt else ""),
                        "decode",
                        result["ms_per_token"],
                        nbytes=step_bytes,
                        note=note,
                    )
                    if path == "decode kernels" and attempt == 0:
                        for row in evaluation.decode_latency(model, LATENCY_CONTEXTS, batch_size=1, steps=32):
                            table.add(
                                "latency",
                                f"{size} B1 context {row['context'] // 1024}k",
                                variant,
                                "decode",
                                row["ms_per_token"],
                                nbytes=decode_floor_bytes(
                                    model, 1, evaluation.check_cache_len(row["context"], 32)
                                ),
                                note=f"cuda_graph={row['cuda_graph']}",
                            )
                del model
                torch.cuda.empty_cache()
        mean = {key: sum(values) / len(values) for key, values in tokens_per_s.items()}
        print(
            f"Table 4, {size}, prompt 4096, batch 4: generated tokens/s (mean over passes), x gated-deltanet's, "
            "x the transformer's, each pass"
        )
        for (variant, path), value in mean.items():
            ratios = [value / mean[peer, path] for peer in ("gated-deltanet", "transformer")]
            passes = " / ".join(f"{v:.1f}" for v in tokens_per_s[variant, path])
            # a step run directly waits on the host at every launch: not comparable with the replayed ones
            direct = "   run without a CUDA graph" if (variant, path) in ungraphed else ""
            print(
                f"  {variant:18} {path:15} {value:8.1f} {ratios[0]:6.2f}x {ratios[1]:6.2f}x   {passes}{direct}"
            )
        for path in DECODE_PATHS[:2]:
            trigger_share = 1 - mean["nirvana", path] / mean["nirvana-notrigger", path]
            print(
                f"decode {size}, {path}: the Trigger's share of nirvana's step (from nirvana-notrigger) "
                f"{trigger_share:.1%}"
            )


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (the Triton kernels are timed on one); none is available here")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.manual_seed(0)
    bandwidth, flops = measure_ceilings()
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; measured copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s"
    )
    table = Table(bandwidth, flops)
    print(Table.header())
    runners = dict(
        swa=bench_swa,
        trigger=bench_trigger,
        delta=bench_delta,
        model=bench_model,
        step=bench_step,
        train=bench_train,
        decode=bench_decode,
        profile=bench_profile,
    )
    for section in args.only:
        try:
            runners[section](table, args)
        except Exception as error:  # one broken contender must not hide the other sections' numbers
            print(f"{section}: failed with {error!r}; going on with the next section")
            torch.cuda.empty_cache()
        table.save(args.out)
    print("\nratios (kernel time / other time; < 1 means the kernel is faster)")
    print("\n".join(table.ratios()))
    table.save(args.out)
    print(f"wrote {os.path.join(args.out, 'bench.json')} and bench.csv")


if __name__ == "__main__":
    main()
