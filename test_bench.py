"""bench.py's profile bookkeeping, on the CPU: which component each kernel's time is charged to.

python -m pytest -q test_bench.py
"""

from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

import bench
import nirvana

CPU, CUDA = DeviceType.CPU, DeviceType.CUDA


def event(name, device_type, start, end, *, id=0, parent=None, linked=0, sequence_nr=-1, annotation=False):
    """A stand-in for torch.autograd.profiler_util.FunctionEvent with the fields attribute_time reads."""
    return SimpleNamespace(
        name=name,
        device_type=device_type,
        time_range=SimpleNamespace(start=start, end=end),
        id=id,
        cpu_parent=parent,
        linked_correlation_id=linked,
        sequence_nr=sequence_nr,
        is_async=False,
        is_user_annotation=annotation,
        self_cpu_time_total=end - start,
    )


def test_attribute_time_charges_every_device_kernel_once():
    """A kernel linked to an op goes to the op's component (in the backward, to the component of the forward op
    with the same sequence number); a kernel linked to none (Triton's launches) to the innermost component
    range around it on the device's timeline, else "other"; a kernel outside every phase to nothing; the ranges
    themselves are not kernels."""
    prefix = bench.ComponentProfile.PREFIX
    forward = event("phase: forward", CPU, 0, 100, id=1, annotation=True)
    block = event(prefix + "Block", CPU, 5, 95, id=2, parent=forward, annotation=True)
    attention = event(prefix + "Attention", CPU, 10, 50, id=3, parent=block, annotation=True)
    mm = event("aten::mm", CPU, 12, 20, id=4, parent=attention, sequence_nr=7)
    launch = event("cudaLaunchKernel", CPU, 13, 14, id=4000, parent=mm, linked=4)  # not an op
    backward = event("phase: backward", CPU, 200, 300, id=5, annotation=True)
    mm_backward = event("MmBackward0", CPU, 210, 220, id=6, parent=backward, sequence_nr=7)
    cpu = [forward, block, attention, mm, launch, backward, mm_backward]
    device = [
        event("phase: forward", CUDA, 1000, 1500, annotation=True),
        event(prefix + "Block", CUDA, 1010, 1400, annotation=True),
        event(prefix + "Attention", CUDA, 1020, 1100, annotation=True),
        event("phase: backward", CUDA, 2000, 2500, annotation=True),
        event("gemm", CUDA, 1021, 1025, linked=4),  # mm's kernel: Attention, 4 us
        event("_attention_step_kernel", CUDA, 1030, 1050, linked=0),  # inside Attention: 20 us
        event("_rms_norm_fwd", CUDA, 1200, 1210, linked=0),  # inside Block only: 10 us
        event("stray", CUDA, 1450, 1458, linked=0),  # in the phase, in no component: other, 8 us
        event("gemm_backward", CUDA, 2010, 2016, linked=6),  # MmBackward0's: Attention in the backward, 6 us
        event("triton_backward", CUDA, 2100, 2103, linked=0),  # unlinked, no component range: other, 3 us
        event("before", CUDA, 10, 20, linked=0),  # outside every phase
        event("launch gap", CUDA, 1060, 1061, linked=999),  # linked to an event not in the trace: by time
    ]
    times, launches = bench.attribute_time(cpu + device, use_device=True)
    assert times == {
        ("forward", "Attention"): 4 + 20 + 1,
        ("forward", "Block"): 10,
        ("forward", "other"): 8,
        ("backward", "Attention"): 6,
        ("backward", "other"): 3,
    }
    assert launches == {
        ("forward", "Attention"): 3,
        ("forward", "Block"): 1,
        ("forward", "other"): 1,
        ("backward", "Attention"): 1,
        ("backward", "other"): 1,
    }


def test_profile_decode_step_charges_every_component_on_the_cpu():
    """The CPU form of bench's decode profile (self CPU time per op) on nirvana-tiny: the model's parts each
    get their row, and the rows add up to the total."""
    torch.manual_seed(0)
    model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset("nirvana-tiny")).eval()
    lines = bench.profile_decode_step("nirvana-tiny", model, 2, 40, steps=2, use_device=False)
    rows = {line[:44].strip(): float(line[44:].split()[0]) for line in lines[2:]}  # component, ms per step
    for component in ("Attention", "Trigger", "GatedDeltaNet", "Updater", "CausalConv", "SwiGLU"):
        assert rows.get(component, 0) > 0, component
    total = float(lines[0].split("total ")[1].split()[0])
    assert abs(sum(rows.values()) - total) <= 0.01 * total + 0.002 * len(rows)


def test_decode_section_times_the_variants_in_both_orders(monkeypatch, capsys):
    """bench's decode section with stand-ins for the model and the timing: the first pass builds the variants
    in the listed order (kernels, then twins, then latencies), the second in reverse (kernels only); the summary
    divides pass means, and the Trigger's share comes from them; a row whose step ran without a CUDA graph is
    marked as such."""
    import eval as evaluation

    built, speeds = [], {}
    for i, variant in enumerate(bench.DECODE_VARIANTS):
        speeds[variant] = [100.0 + 10 * i, 120.0 + 10 * i]  # tokens/s of the first, second pass

    def speed_model(variant, size, backend, device, dtype, vocab_size):
        built.append(variant)
        embedding = SimpleNamespace(weight=torch.empty(3))
        return SimpleNamespace(
            variant=variant,
            num_params=lambda: 10,
            token_embedding=embedding,
            twins=False,
            buffers=lambda: [],
            setup_caches=lambda batch_size, max_seq_len: None,
            clear_caches=lambda: None,
        )

    def decode_speed(model, prompt_len, batch_size, new_tokens, compile):
        passes = built.count(model.variant)
        value = speeds[model.variant][passes - 1] / (2 if model.twins else 1) * (3 if compile else 1)
        graphed = not (model.twins and model.variant == "transformer")  # the graph check failed for these
        result = dict(decode_tokens_per_s=value, ms_per_token=1e3 * batch_size / value, cuda_graph=graphed)
        return result | (dict(compiled_rel_error=1e-3, setup_s=5.0) if compile else {})

    latency = lambda model, contexts, batch_size, steps: [
        dict(context=c, ms_per_token=1.0, cuda_graph=True) for c in contexts
    ]
    monkeypatch.setattr(evaluation, "speed_model", speed_model)
    monkeypatch.setattr(evaluation, "decode_speed", decode_speed)
    monkeypatch.setattr(evaluation, "decode_latency", latency)
    monkeypatch.setattr(bench, "with_torch_decode_steps", lambda model: setattr(model, "twins", True))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    table = bench.Table(bandwidth=1e12, flops=1e15)
    bench.bench_decode(table, SimpleNamespace(decode_sizes=["350m"], decode_passes=2))
    assert built == list(bench.DECODE_VARIANTS) + list(reversed(bench.DECODE_VARIANTS))
    impls = [row["impl"] for row in table.rows if row["section"] == "decode"]
    assert impls[:3] == ["nirvana, decode kernels", "nirvana, compiled", "nirvana, torch twins"]
    assert impls[-2:] == ["nirvana, decode kernels, pass 2", "nirvana, compiled, pass 2"]
    assert len(impls) == 5 * len(bench.DECODE_VARIANTS)
    assert sum(row["section"] == "latency" for row in table.rows) == 3 * len(bench.DECODE_VARIANTS)
    out = capsys.readouterr().out
    mean = {v: sum(s) / 2 for v, s in speeds.items()}
    nirvana_line = next(
        line for line in out.splitlines() if line.startswith("  nirvana ") and "kernels" in line
    )
    assert f"{mean['nirvana']:8.1f} {mean['nirvana'] / mean['gated-deltanet']:6.2f}x" in nirvana_line
    assert "100.0 / 120.0" in nirvana_line
    compiled_line = next(
        line for line in out.splitlines() if line.startswith("  nirvana ") and "compiled" in line
    )
    assert f"{3 * mean['nirvana']:8.1f} {mean['nirvana'] / mean['gated-deltanet']:6.2f}x" in compiled_line
    summary = [line for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[:3] for line in summary if line.endswith("run without a CUDA graph")] == [
        ["transformer", "torch", "twins"]
    ]
    share = f"{1 - mean['nirvana'] / mean['nirvana-notrigger']:.1%}"
    assert f"decode kernels: the Trigger's share of nirvana's step (from nirvana-notrigger) {share}" in out
    assert f"compiled: the Trigger's share of nirvana's step (from nirvana-notrigger) {share}" in out


def test_decode_floor_counts_the_weights_and_every_cache():
    """The transformer's floor by hand: its weights but the embedding table in bf16, and per layer a float32
    KV cache (B, slots, H, D) twice and the slots' int64 positions; a Nirvana layer adds its ring buffer."""
    import nirvana

    config = nirvana.NirvanaConfig.from_preset("transformer-tiny")
    model = nirvana.Nirvana(config)
    B, slots, H, D = 3, 40, config.n_heads, config.head_dim
    weights = 2 * (model.num_params() - model.token_embedding.weight.numel())
    caches = config.n_layers * (2 * B * slots * H * D * 4 + slots * 8)
    assert bench.decode_floor_bytes(model, B, slots) == weights + caches
    assert model.max_seq_len is None  # the caches are gone again
    floors = {}
    for variant in ("nirvana-notrigger", "gated-deltanet"):
        model = nirvana.Nirvana(nirvana.NirvanaConfig.from_preset(f"{variant}-tiny"))
        floors[variant] = bench.decode_floor_bytes(model, B, slots) - 2 * model.num_params()
    assert floors["nirvana-notrigger"] > floors["gated-deltanet"] + B * slots * H * D * 4
