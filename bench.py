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
           clipping + AdamW on one micro-batch (--train-shape, default 4,4096), eager and torch.compile'd:
           tokens/s, MFU (train.py's FLOP count), peak memory, and tokens/s relative to the first preset.
  decode   the paper's Table 4: generated tokens/s at prompt 4096, batch 4, 128 new tokens for nirvana,
           nirvana-notrigger, gated-deltanet and transformer (KV cache) of one size (--decode-size, default
           350m, random weights, CUDA-graph replays of the decode step), through eval.decode_speed.
           `python eval.py speed` adds the ms/token-vs-context curve and its PNG.
Every row has the floor: max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth), both
measured at the start of the run. Times are medians of triton.testing.do_bench on random non-zero data.
Results: a table on stdout, and bench.json + bench.csv under --out.
"""
import argparse
import csv
import json
import os
from pathlib import Path
import sys

import torch

SECTIONS = ("swa", "trigger", "delta", "model", "step", "train", "decode")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.csv")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--seq-lens", default="4096,16384", help="T values for the SWA section")
    parser.add_argument("--step-preset", default="nirvana-350m", help="preset of the step section")
    parser.add_argument("--step-shape", default="2,2048", help="batch,tokens of the step section")
    parser.add_argument("--train-presets", default="nirvana-350m,gated-deltanet-350m,transformer-350m",
                        help="presets of the train section; ratios are to the first")
    parser.add_argument("--train-shape", default="4,4096", help="micro-batch,tokens of the train section")
    parser.add_argument("--train-modes", default="eager,compiled", help="eager and/or compiled (torch.compile)")
    parser.add_argument("--decode-size", default="350m", help="preset size of the decode section")
    args = parser.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


# ------------------------------------------------------------------------------------------------------
# Timing and the two ceilings


def bench_ms(fn, grad_to_none=None):
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")


def measure_ceilings():
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate (FLOP/s), measured here."""
    src = torch.randn(256 * 2**20, device="cuda")                                     # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / (copy_ms * 1e-3)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = bench_ms(lambda: a @ b)
    flops = 2 * 8192**3 / (mm_ms * 1e-3)
    del src, dst, a, b
    return bandwidth, flops


class Table:
    def __init__(self, bandwidth, flops):
        self.bandwidth, self.flops, self.rows = bandwidth, flops, []

    def add(self, section, case, impl, mode, ms, flop=None, nbytes=None, error=None, note=""):
        floor = max(flop / self.flops if flop else 0.0, nbytes / self.bandwidth if nbytes else 0.0) * 1e3
        row = dict(section=section, case=case, impl=impl, mode=mode, ms=ms, floor_ms=floor or None,
                   tflops=(flop / (ms * 1e-3) / 1e12) if flop and ms else None, rel_error=error, note=note)
        self.rows.append(row)
        print(self.format(row), flush=True)

    @staticmethod
    def header():
        return (f"{'section':8} {'case':26} {'impl':22} {'mode':11} {'ms':>9} {'floor ms':>9} {'TFLOP/s':>8} "
                f"{'rel.err':>8}  note")

    @staticmethod
    def format(r):
        num = lambda x, f: format(x, f) if isinstance(x, (int, float)) else "-"
        return (f"{r['section']:8} {r['case']:26} {r['impl']:22} {r['mode']:11} {num(r['ms'], '9.3f')} "
                f"{num(r['floor_ms'], '9.3f')} {num(r['tflops'], '8.1f')} {num(r['rel_error'], '8.1e')}  {r['note']}")

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
                    lines.append(f"{section:8} {case:26} {mode:11} kernel / {other['impl']:22} = "
                                 f"{kernel['ms'] / other['ms']:6.3f}")
        return lines

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    bandwidth_GBps=self.bandwidth / 1e9, bf16_matmul_TFLOPs=self.flops / 1e12)
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
    import nirvana
    import kernels
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    B, H, D, W = args.batch, args.heads, args.head_dim, args.window
    for T in [int(t) for t in args.seq_lens.split(",")]:
        case = f"B{B} T{T} H{H} D{D} W{W}"
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))   # (B, H, T, D)
        grad_out_h = grad_out.transpose(1, 2).contiguous()

        def window_mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

        block_mask = create_block_mask(window_mask, None, None, T, T, device="cuda")
        pairs = sum(min(i + 1, W) for i in range(T))                                  # visible (query, key) pairs
        causal_pairs = T * (T + 1) // 2
        io = 4 * B * T * H * D * 2                                                    # q, k, v, o in bf16
        sdpa = torch.nn.functional.scaled_dot_product_attention
        contenders = [   # name, function, inputs, output gradient, visible (query, key) pairs
            ("triton kernel", lambda q, k, v: kernels.sliding_window_attention(q, k, v, W), (q, k, v), grad_out, pairs),
            ("torch reference", lambda q, k, v: nirvana.sliding_window_attention(q, k, v, W), (q, k, v), grad_out,
             pairs),
            ("flex_attention SWA", lambda q, k, v: flex(q, k, v, block_mask=block_mask), (qh, kh, vh), grad_out_h,
             pairs),
            ("sdpa full causal", lambda q, k, v: sdpa(q, k, v, is_causal=True), (qh, kh, vh), grad_out_h, causal_pairs),
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
    import nirvana
    import kernels

    N = N or args.batch * 4096
    D = K = 64
    model_case_times = {}
    for dtype, label in ((torch.bfloat16, "bf16 q~k~v~"), (torch.float32, "fp32")):
        case = f"N{N} d_t{D} K{K} {label}"
        inputs = trigger_inputs(N, D, K, dtype)
        with torch.no_grad():
            c, p = kernels.trigger_step(*inputs)
        c_ref, p_ref = nirvana.trigger_step(*[x.detach().float() for x in inputs])   # float32 reference
        error = max(rel_error(c, c_ref), rel_error(p, p_ref))
        cost = trigger_cost(N, D, K, dtype)
        for name, fn in (("triton kernel", kernels.trigger_step), ("torch reference", nirvana.trigger_step)):
            with torch.no_grad():
                ms, note = time_or_note(lambda: fn(*inputs))
            table.add(section, case, name, "fwd", ms, *cost["fwd"], error if name == "triton kernel" else None, note)

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
        import triton
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        import fla.ops.common.chunk_o as fla_chunk_o
    except ImportError:
        return None
    if not getattr(fla_chunk_o, "TRITON_ABOVE_3_7_1", True):
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
        print(f"delta: fla's backward refuses Triton {triton.__version__} on Hopper (wrong results reported by fla);"
              " its check is bypassed here to time it - see its gradient error in the table")
    return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)


def bench_delta(table, args):
    import nirvana
    from kernels.gated_delta_rule import gated_delta_rule

    B, H, D, T = args.batch, args.heads, args.head_dim, 4096
    case = f"B{B} T{T} H{H} D{D}"
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).bfloat16().requires_grad_()
            for _ in range(2))
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
            table.add("delta", case, name, "fwd+bwd GPU", gpu_kernel_ms(step, grad_to_none=inputs), 3 * flop, 2.5 * io,
                      note="sum of its GPU kernels' times (torch.profiler), without the host's launch gaps")


def bench_model(table, args):
    """One Nirvana block of the 1.3b preset (d_model 2048, 16 heads of 128, window 2048), bf16 autocast,
    with the torch ops, all Triton ops, and the Triton SWA + Trigger beside torch's gated delta rule."""
    import nirvana
    import kernels

    B, T = args.batch, 4096
    case = f"1.3b block B{B} T{T}"
    config = nirvana.NirvanaConfig.from_preset("nirvana-1.3b", n_layers=3, n_prelude=2)
    h = torch.randn(B, T, config.d_model, device="cuda", requires_grad=True)
    op_sets = dict(torch=nirvana.load_backend("torch"), triton=nirvana.load_backend("triton"),
                   swa_trigger=type(nirvana.TORCH_OPS)(gated_delta_rule=nirvana.gated_delta_rule,
                                                       sliding_window_attention=kernels.sliding_window_attention,
                                                       trigger_step=kernels.trigger_step))
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
        except Exception as error:   # e.g. a kernel that rejects what the model passes: report, go on
            ms, note = None, f"failed: {error!r}"[:160]
        times[name] = ms
        table.add("model", case, f"block ({name} ops)", "fwd+bwd", ms, note=note)
        del block, bank
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
        del model
        torch.cuda.empty_cache()
    print(f"step: {case} loss with backend triton {losses['triton']:.6f}, torch {losses['torch']:.6f} "
          f"(relative difference {abs(losses['triton'] - losses['torch']) / losses['torch']:.2e})")
    if times["triton"] and times["torch"]:
        print(f"step: backend triton is {times['torch'] / times['triton']:.2f}x as fast as backend torch")


def time_training_steps(step, warmup=3, steps=10):
    """Median ms of `steps` calls of step() after `warmup` calls (the first compiles)."""
    import statistics
    import time

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_train(table, args):
    """Tokens/s of one training step per preset and mode, as train.py runs it (its optimizer and FLOP count)."""
    import nirvana
    import train

    B, T = (int(x) for x in args.train_shape.split(","))
    presets = [p.strip() for p in args.train_presets.split(",") if p.strip()]
    modes = [m.strip() for m in args.train_modes.split(",") if m.strip()]
    idx = torch.randint(0, 32000, (B, T), device="cuda")
    peak = train.peak_flops(torch.device("cuda"))
    for mode in modes:
        tokens_per_s = {}
        for preset in presets:
            torch.manual_seed(0)
            config = nirvana.NirvanaConfig.from_preset(preset, backend="triton")
            model = nirvana.Nirvana(config).cuda()
            forward = torch.compile(model) if mode == "compiled" else model
            run_args = train.parse_args(["--preset", preset])   # train.py's defaults: AdamW settings, clipping
            optimizer = train.build_optimizer(run_args, model)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = forward(idx, idx)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), run_args.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            try:
                ms = time_training_steps(step)
                tokens_per_s[preset] = B * T / (ms * 1e-3)
                flop = train.flops_per_token(config, model, T) * B * T
                mfu = flop / (ms * 1e-3) / peak if peak else None
                note = (f"{tokens_per_s[preset]:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, "
                        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
                        f"{model.num_params() / 1e6:.0f}M params")
            except torch.OutOfMemoryError:
                ms, flop, note = None, None, "out of memory"
            table.add("train", f"{preset} B{B} T{T}", f"step ({mode})", "step", ms, flop, note=note)
            del model, forward, optimizer
            torch.cuda.empty_cache()
        first = presets[0]
        for preset in presets[1:]:
            if first in tokens_per_s and preset in tokens_per_s:
                print(f"train ({mode}): {first} at {tokens_per_s[first] / tokens_per_s[preset]:.2f}x the tokens/s "
                      f"of {preset}")


def bench_decode(table, args):
    """Table 4 of the paper: decode throughput of four variants of one size, side by side."""
    import eval as evaluation

    for variant in ("nirvana", "nirvana-notrigger", "gated-deltanet", "transformer"):
        model = evaluation.speed_model(variant, args.decode_size, "triton", "cuda", torch.bfloat16, 32000)
        result = evaluation.decode_speed(model, prompt_len=4096, batch_size=4, new_tokens=128)
        note = f"{result['decode_tokens_per_s']:.1f} generated tokens/s, cuda_graph={result['cuda_graph']}"
        table.add("decode", f"{args.decode_size} prompt4096 B4", variant, "decode", result["ms_per_token"], note=note)
        del model
        torch.cuda.empty_cache()


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (the Triton kernels are timed on one); none is available here")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.manual_seed(0)
    bandwidth, flops = measure_ceilings()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; measured copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    table = Table(bandwidth, flops)
    print(Table.header())
    runners = dict(swa=bench_swa, trigger=bench_trigger, delta=bench_delta, model=bench_model, step=bench_step,
                   train=bench_train, decode=bench_decode)
    for section in args.only:
        try:
            runners[section](table, args)
        except Exception as error:   # one broken contender must not hide the other sections' numbers
            print(f"{section}: failed with {error!r}; going on with the next section")
            torch.cuda.empty_cache()
        table.save(args.out)
    print("\nratios (kernel time / other time; < 1 means the kernel is faster)")
    print("\n".join(table.ratios()))
    table.save(args.out)
    print(f"wrote {os.path.join(args.out, 'bench.json')} and bench.csv")


if __name__ == "__main__":
    main()
