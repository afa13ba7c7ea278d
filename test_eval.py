"""Tests of eval.py and sample.py on the CPU with tiny random-weight models (a few seconds each)."""

import dataclasses
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
import sample
from cli import UserError, load_model
from nirvana import Nirvana, NirvanaConfig
from tokenizer import load_tokenizer

# lm_eval's datasets and hub clients read these when first imported: the harness tests use local files only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOK = load_tokenizer("bytes")
TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. Fortune favours the bold. "
) * 4


def tiny_model(variant="nirvana", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = NirvanaConfig.from_preset(f"{variant}-tiny", vocab_size=TOK.vocab_size, **overrides)
    return Nirvana(cfg).eval()


def save_checkpoint(model, path, tokenizer="bytes"):
    torch.save(
        {"config": dataclasses.asdict(model.config), "model": model.state_dict(), "tokenizer": tokenizer},
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def direct_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward: (len(ids) - 1,) float64."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(idx)
    logp = F.log_softmax(logits[0, :-1].double(), dim=-1)
    return logp.gather(1, idx[0, 1:, None])[:, 0], logits[0, :-1].argmax(-1) == idx[0, 1:]


# ----------------------------------------------------------------------------------------------- S-NIAH


@pytest.mark.parametrize("task_id", list(ev.NIAH_TASKS))
@pytest.mark.parametrize("length", [512, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_niah_sample_has_exactly_one_needle_where_asked(task_id, length, depth):
    s = ev.make_niah_sample(task_id, length, depth, TOK, seed=7, answer_tokens=16)
    kinds = ev.NIAH_TASKS[task_id].value + "s"
    needle = ev.NIAH_NEEDLE.format(kinds=kinds, key=s.key, value=s.answer)
    assert s.prompt.count(needle) == 1
    assert s.prompt.count(s.answer) == 1  # the value appears only in the needle
    assert s.prompt.index(needle) == s.needle_start
    assert s.prompt.endswith(f"for {s.key} mentioned in the provided text is")
    # the needle sits between whole haystack sentences, at the asked fraction of the haystack
    haystack = s.prompt[s.haystack_start : s.haystack_end]
    sentences = haystack.replace(needle, "").split(".")
    n_sentences = len([x for x in sentences if x.strip()])
    before = s.prompt[s.haystack_start : s.needle_start]
    assert before == "" or before.endswith(". ")
    assert before.count(".") == round(depth * n_sentences)
    # the prompt plus the answer budget fills the length: one more sentence would not fit
    assert s.prompt_tokens == len(TOK.encode(s.prompt)) <= length - 16
    assert s.prompt_tokens > length - 16 - 80  # < one sentence (<= 80 bytes) of slack


def test_pass_key_haystack_is_the_noise_cycle():
    s = ev.make_niah_sample("pk", 2048, 0.4, TOK, seed=3)
    needle = ev.NIAH_NEEDLE.format(kinds="numbers", key=s.key, value=s.answer)
    haystack = s.prompt[s.haystack_start : s.haystack_end].replace(needle + " ", "")
    cycle = " ".join(ev.NOISE_SENTENCES)
    assert haystack.startswith(cycle + " " + cycle)
    assert {x + "." for x in haystack.rstrip(".").split(". ")} == set(ev.NOISE_SENTENCES)


def test_niah_samples_differ_by_seed_and_reject_bad_input():
    a = ev.make_niah_sample("n", 512, 0.5, TOK, seed=1)
    b = ev.make_niah_sample("n", 512, 0.5, TOK, seed=2)
    assert (a.key, a.answer) != (b.key, b.answer)
    assert a == ev.make_niah_sample("n", 512, 0.5, TOK, seed=1)  # deterministic
    with pytest.raises(UserError, match="unknown S-NIAH task"):
        ev.make_niah_sample("x", 512, 0.5, TOK, seed=1)
    with pytest.raises(UserError, match="unknown S-NIAH task"):
        ev.run_niah(None, TOK, ["pk", "q"], [0.5], samples=1)
    with pytest.raises(UserError, match="depth"):
        ev.make_niah_sample("n", 512, 1.5, TOK, seed=1)
    with pytest.raises(UserError, match="too short"):
        ev.make_niah_sample("n", 100, 0.5, TOK, seed=1)
    with pytest.raises(UserError, match="too short"):  # checked before the first answer is generated
        ev.run_niah(None, TOK, ["pk"], [0.5], samples=1, lengths=[1000, 100])


def test_niah_scorer_on_known_answers():
    assert ev.niah_correct(" 4817263.", "4817263")
    assert ev.niah_correct("The special magic number is 4817263 indeed", "4817263")
    assert not ev.niah_correct(" 481726.", "4817263")
    assert not ev.niah_correct("", "4817263")
    assert ev.niah_correct(" APRICOT", "apricot")
    assert not ev.niah_correct(" apple", "apricot")
    records = [{"task": "pk", "length": 2048, "correct": c} for c in (True, True, False, True)]
    records += [{"task": "w", "length": 1024, "correct": False}]
    acc = ev.niah_accuracy(records)
    assert acc == {("pk", 2048): 75.0, ("w", 1024): 0.0}
    table = ev.niah_table({"m": acc})
    assert "S-NIAH-PK 2K" in table and "S-NIAH-W 1K" in table and "| m | 75.0 | 0.0 | 37.5 |" in table


def test_niah_run_scores_the_models_greedy_answer(model, checkpoint, tmp_path):
    records = ev.run_niah(model, TOK, ["pk", "w"], [0.5], samples=1, lengths=[420], answer_tokens=6)
    assert len(records) == 2
    for r in records:
        s = ev.make_niah_sample(r["task"], 420, 0.5, TOK, seed=0, answer_tokens=6)
        ids = TOK.encode(s.prompt)
        for _ in range(6):  # greedy by re-running the full forward
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert r["prediction"] == TOK.decode([i for i in ids[-6:] if i != TOK.eos_id])
        assert r["correct"] == ev.niah_correct(r["prediction"], r["answer"])
    ev.main(
        [
            "niah",
            "--checkpoint",
            checkpoint,
            "--tasks",
            "pk",
            "--lengths",
            "420",
            "--depths",
            "0,1",
            "--samples",
            "1",
            "--answer-tokens",
            "4",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert "S-NIAH-PK" in (tmp_path / "niah_tiny.md").read_text()
    assert (tmp_path / "niah_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "niah_tiny_predictions.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------------------------- perplexity


def test_score_tokens_equals_the_forward_pass(model):
    idx = torch.randint(0, TOK.vocab_size, (2, 50))
    tgt = torch.randint(0, TOK.vocab_size, (2, 50))
    logprob, greedy = ev.score_tokens(model, idx, tgt, head_chunk=16)
    logits, _ = model(idx)
    expected = F.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(logprob, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy, logits.argmax(-1) == tgt)


def test_perplexity_equals_exp_of_mean_token_loss(model):
    tokens = np.random.default_rng(0).integers(0, TOK.vocab_size, 300)
    result = ev.perplexity(model, tokens, context_length=64, batch_size=3)
    losses, count = [], 0
    for s in range(0, 299, 64):  # windows of <= 64 predictions, fresh state
        window = torch.tensor(tokens[s : s + 65])[None]
        _, loss = model(window[:, :-1], window[:, 1:])
        losses.append(loss.item() * (window.shape[1] - 1))
        count += window.shape[1] - 1
    assert result["tokens"] == count == 299
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / count), rel=1e-5)
    with pytest.raises(UserError, match="at least 2 tokens"):
        ev.perplexity(model, tokens[:1], 64)


def test_ppl_and_extrapolate_commands(model, checkpoint, tmp_path, capsys):
    text_file = tmp_path / "val.txt"
    text_file.write_text(TEXT)
    ev.main(
        [
            "ppl",
            "--checkpoint",
            checkpoint,
            "--data",
            str(text_file),
            "--context-length",
            "100",
            "--out-dir",
            str(tmp_path),
        ]
    )
    stem = tmp_path / "ppl_tiny_val"  # named after the checkpoint and the data
    assert f"wrote {stem}.md, {stem}.json, {stem}.png" in capsys.readouterr().out
    result = json.loads(stem.with_suffix(".json").read_text())
    expected = ev.perplexity(model, TOK.encode(TEXT), 100)
    assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
    assert f"| {result['ppl']:.4f} |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    ev.main(
        [
            "extrapolate",
            "--checkpoint",
            checkpoint,
            "--data",
            str(text_file),
            "--lengths",
            "64,128,256",
            "--out-dir",
            str(tmp_path),
        ]
    )
    curves = json.loads((tmp_path / "extrapolation_tiny.json").read_text())
    rows = curves["tiny (nirvana)"]
    assert [r["context_length"] for r in rows] == [64, 128, 256]
    assert rows[1]["ppl"] == pytest.approx(ev.perplexity(model, TOK.encode(TEXT), 128)["ppl"], rel=1e-6)
    assert (tmp_path / "extrapolation_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tiny (nirvana) |" in (tmp_path / "extrapolation_tiny.md").read_text()


def test_results_are_named_after_the_run_folder():
    assert ev.model_name("out/nirvana-tiny/ckpt.pt") == "nirvana-tiny"
    assert ev.model_name("runs/a.pt") == "a"


def test_read_tokens_from_a_prepared_folder(tmp_path):
    import prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30)
    meta = prepare.prepare([str(corpus)], str(tmp_path / "data"), tokenizer="bytes", val_fraction=0.5)
    tokens = ev.read_tokens(str(tmp_path / "data"), TOK, "val")
    assert len(tokens) == sum(s["tokens"] for s in meta["val"])
    assert TOK.decode(tokens[:50].tolist()) in TEXT * 30
    shard = tmp_path / "data" / meta["val"][0]["file"]
    assert np.array_equal(ev.read_tokens(str(shard), TOK)[:100], tokens[:100])
    other = SimpleNamespace(vocab_size=512, spec="other.model")
    with pytest.raises(UserError, match="vocab"):
        ev.read_tokens(str(tmp_path / "data"), other)
    with pytest.raises(UserError, match="does not exist"):
        ev.read_tokens(str(tmp_path / "missing.txt"), TOK)


# ----------------------------------------------------------------------------------------------- LAMBADA


def test_lambada_matches_direct_scoring(model, tmp_path):
    texts = [
        "the cat sat on the mat",
        "we went to the river to fish",
        "she opened the old wooden door",
        "a stitch in time saves nine",
    ]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    examples = ev.read_lambada(str(path))
    assert examples[0] == ("the cat sat on the", " mat")
    result = ev.lambada(model, TOK, examples, max_length=256, batch_size=3)
    logprobs, greedy = [], []
    for context, target in examples:
        lp, g = direct_logprobs(model, TOK.encode(context + target))
        n = len(TOK.encode(target))
        logprobs.append(lp[-n:].sum().item())
        greedy.append(bool(g[-n:].all()))
    assert result["ppl"] == pytest.approx(math.exp(-sum(logprobs) / len(texts)), rel=1e-5)
    assert result["acc"] == pytest.approx(100.0 * sum(greedy) / len(texts))
    path.write_text('{"text": "fine line"}\n{"txt": "wrong key"}\n')
    with pytest.raises(UserError, match=":2 is not a JSON object with a 'text' field"):
        ev.read_lambada(str(path))


# ----------------------------------------------------------------------------------------------- lm-eval


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_harness_loglikelihood_equals_summed_logprobs(model):
    lm = ev.HarnessLM(model, TOK, batch_size=2, max_length=256)
    reqs = requests(
        ("The quick brown", " fox"),
        ("Fortune favours", " the bold."),
        ("", "Hello"),
        ("A journey of a thousand ", "miles"),
        ("x" * 300, " tail"),
    )
    out = lm.loglikelihood(reqs)
    expected_pairs = [
        ("The quick brown", " fox"),
        ("Fortune favours", " the bold."),
        (None, "Hello"),
        ("A journey of a thousand", " miles"),
        ("x" * 300, " tail"),
    ]
    for (logprob, is_greedy), (context, continuation) in zip(out, expected_pairs):
        ids = ([TOK.eos_id] if context is None else TOK.encode(context)) + TOK.encode(continuation)
        ids = ids[-257:]  # max_length 256 predictions: left-truncated
        lp, g = direct_logprobs(model, ids)
        n = len(TOK.encode(continuation))
        assert logprob == pytest.approx(lp[-n:].sum().item(), rel=1e-5, abs=1e-4)
        assert is_greedy == bool(g[-n:].all())


def test_harness_model_from_lm_eval_arg_string(checkpoint):
    lm = ev.HarnessLM.create_from_arg_string(
        f"checkpoint={checkpoint},device=cpu,batch_size=4,max_length=128",
        {"batch_size": None, "max_batch_size": None, "device": None},
    )
    assert (lm.batch_size, lm.max_length, lm.tok.spec) == (4, 128, "bytes")
    assert lm.model.config.variant == "nirvana" and not lm.model.training
    with pytest.raises(ValueError, match="checkpoint="):
        ev.HarnessLM.create_from_arg_string("device=cpu")


def test_harness_rolling_loglikelihood(model):
    text = TEXT[:200]
    ids = [TOK.eos_id] + TOK.encode(text)
    whole = ev.HarnessLM(model, TOK, max_length=512).loglikelihood_rolling(requests((text,)))[0]
    assert whole == pytest.approx(direct_logprobs(model, ids)[0].sum().item(), rel=1e-5)
    windowed = ev.HarnessLM(model, TOK, max_length=64).loglikelihood_rolling(requests((text,)))[0]
    expected = sum(
        direct_logprobs(model, ids[s : s + 65])[0].sum().item() for s in range(0, len(ids) - 1, 64)
    )
    assert windowed == pytest.approx(expected, rel=1e-5)


def test_harness_generate_until_is_greedy_and_stops(model):
    lm = ev.HarnessLM(model, TOK, max_length=256)
    context = "The quick brown fox"
    ids = TOK.encode(context)
    for _ in range(12):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    greedy = bytes(ids[len(context) :]).decode("utf-8", errors="replace")
    [full] = lm.generate_until(requests((context, {"until": [], "max_gen_toks": 12})))
    assert full == greedy
    stop = greedy[5:7]
    [cut] = lm.generate_until(requests((context, {"until": [stop], "max_gen_toks": 12})))
    assert cut == greedy[: greedy.index(stop)]


def test_lm_eval_registration_when_installed(model, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    lm_class = ev.register_lm_eval()
    assert ev.register_lm_eval() is lm_class
    from lm_eval.api.registry import get_model

    assert get_model("nirvana") is lm_class
    docs = [
        {"question": "The cat sat on the", "choices": [" mat", " moon"], "label": 0},
        {"question": "Fortune favours the", "choices": [" bold", " tired"], "label": 0},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "fake.yaml").write_text(
        "task: nirvana_fake_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    lm = lm_class(model, TOK, batch_size=2)
    task_manager = TaskManager(include_path=str(tmp_path))
    assert set(ev.harness_task_names("paper")) <= set(task_manager.all_tasks)  # real lm-eval task names
    results = lm_eval.simple_evaluate(model=lm, tasks=["nirvana_fake_mc"], task_manager=task_manager)
    picks = []
    for d in docs:
        scores = [ll for ll, _ in lm.loglikelihood(requests(*[(d["question"], c) for c in d["choices"]]))]
        picks.append(int(np.argmax(scores)) == d["label"])
    assert results["results"]["nirvana_fake_mc"]["acc,none"] == pytest.approx(np.mean(picks))


def test_harness_command_runs_the_local_tasks_through_lm_eval(model, checkpoint, tmp_path):
    """`eval.py harness` with its default task list (the corpus tasks and RULER's niah_single_1) through the
    real lm_eval, offline; the corpus tasks' numbers recomputed here from the model and the task files."""
    pytest.importorskip("lm_eval")
    ev.main(
        [
            "harness",
            "--checkpoint",
            checkpoint,
            "--limit",
            "2",
            "--niah-lengths",
            "512",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "harness_tiny.json").read_text())
    got = {(task, metric): value for task, metric, value in ev.harness_results_table(results)}
    assert {task for task, _ in got} == {
        "nirvana_corpus_ppl",
        "nirvana_lastword",
        "nirvana_choice",
        "niah_single_1",
    }

    def docs(name):  # --limit 2: the first two documents of each task
        lines = (tmp_path / "tasks" / f"{name}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines[:2]]

    texts = [d["text"] for d in docs("nirvana_corpus_ppl")]
    lm = ev.HarnessLM(model, TOK, max_length=512)  # the context (256) raised to the niah length
    logprob = sum(lm.loglikelihood_rolling(requests(*[(t,) for t in texts])))
    bits_per_byte = -logprob / sum(len(t.encode()) for t in texts) / math.log(2)
    assert got["nirvana_corpus_ppl", "bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-5)
    examples = [tuple(d["text"].rsplit(" ", 1)) for d in docs("nirvana_lastword")]
    lambada = ev.lambada(model, TOK, [(c, " " + w) for c, w in examples], 512, batch_size=2)
    # a random model's perplexity is about e^50: compared as the mean log-probability, to 1e-4 nats
    mean_logprob = math.log(lambada["ppl"])
    assert math.log(got["nirvana_lastword", "perplexity"]) == pytest.approx(mean_logprob, abs=1e-4)
    assert got["nirvana_lastword", "acc"] == pytest.approx(lambada["acc"] / 100)
    picks, picks_norm = [], []
    for d in docs("nirvana_choice"):
        pairs = [(d["context"], " " + c) for c in d["choices"]]
        scores = [ll for ll, _ in lm.loglikelihood(requests(*pairs))]
        picks.append(int(np.argmax(scores)) == d["label"])
        # lm-eval: the choice's characters
        norm = [score / len(choice) for score, choice in zip(scores, d["choices"])]
        picks_norm.append(int(np.argmax(norm)) == d["label"])
    assert got["nirvana_choice", "acc"] == pytest.approx(np.mean(picks))
    assert got["nirvana_choice", "acc_norm"] == pytest.approx(np.mean(picks_norm))
    assert 0.0 <= got["niah_single_1", "512"] <= 1.0
    assert (tmp_path / "tasks" / "tokenizer" / "tokenizer_config.json").is_file()  # what RULER sized with
    table = (tmp_path / "harness_tiny.md").read_text()
    assert "| nirvana_choice | acc |" in table and "| niah_single_1 | 512 |" in table


def test_harness_task_lists():
    assert ev.harness_task_names("local") == [
        "nirvana_corpus_ppl",
        "nirvana_lastword",
        "nirvana_choice",
        "niah_single_1",
    ]
    paper = ev.harness_task_names("paper")
    assert {"wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "boolq"} <= set(paper)
    assert ev.harness_task_names("piqa,local,piqa")[:2] == ["piqa", "nirvana_corpus_ppl"]


# ----------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    "variant", ["nirvana", "nirvana-notrigger", "nirvana-rope", "gated-deltanet", "hybrid", "transformer"]
)
def test_cached_generation_equals_full_forward_generation(variant):
    model = tiny_model(variant, seed=1)
    prompt = torch.randint(0, TOK.vocab_size, (2, 40))  # longer than the window of 32
    out = model.generate(prompt, 16, temperature=0)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])  # one full forward over the result
    chosen = logits[:, 39:].gather(-1, out[:, 40:, None])[..., 0]
    best = logits[:, 39:].max(-1).values
    # each generated token is the full forward's argmax (up to float ties)
    assert torch.all(chosen >= best - 1e-4), (
        f"{variant}: cached greedy decoding left the full forward's argmax"
    )


def test_sample_command_is_greedy_at_temperature_zero(model, checkpoint, capsys):
    [text] = sample.main(
        [
            "--checkpoint",
            checkpoint,
            "--prompt",
            "Fortune favours",
            "--temperature",
            "0",
            "--max-new-tokens",
            "10",
            "--device",
            "cpu",
        ]
    )
    ids = TOK.encode("Fortune favours")
    for _ in range(10):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    new = ids[len(TOK.encode("Fortune favours")) :]
    assert text == TOK.decode(new[: new.index(TOK.eos_id)] if TOK.eos_id in new else new)
    assert capsys.readouterr().out.startswith("Fortune favours")
    texts = sample.sample(model, TOK, "", num_samples=3, max_new_tokens=5, temperature=1.0, top_k=5)
    assert len(texts) == 3


def test_checkpoint_without_tokenizer_is_a_clear_error(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "notok.pt", tokenizer=None)
    with pytest.raises(UserError, match="names no tokenizer"):
        load_model(path, "cpu")
    m, tok = load_model(path, "cpu", tokenizer="bytes")
    assert tok.vocab_size == 257 and not m.training
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"), "cpu")


# ----------------------------------------------------------------------------------------------- gates, speed


def test_gates_heatmap(model, checkpoint, tmp_path):
    ids = TOK.encode("The patient's scan shows a small lesion.")
    t, p_norm = ev.gate_maps(model, ids)
    post_prelude = model.config.n_layers - model.config.n_prelude
    assert t.shape == p_norm.shape == (post_prelude, len(ids))
    assert np.all((t > 0) & (t < 1)) and np.all(p_norm > 0)
    _, _, trace = model(torch.tensor([ids]), None, return_trace=True)
    assert np.allclose(p_norm[-1], trace["p"][-1][0].norm(dim=-1).numpy())
    ev.main(["gates", "--checkpoint", checkpoint, "--text", "Hello gates", "--out-dir", str(tmp_path)])
    assert (tmp_path / "gates_tiny.png").read_bytes()[:4] == b"\x89PNG"
    saved = np.load(tmp_path / "gates_tiny.npz")
    assert saved["t"].shape == (post_prelude, len("Hello gates"))
    with pytest.raises(UserError, match="no Updater gate"):
        ev.gate_maps(tiny_model("gated-deltanet"), ids)


def test_decode_speed_times_real_decoding():
    model = tiny_model("nirvana", seed=2)
    prompt = ev.random_prompt(model, 2, 48)
    _, _, logits = ev.prefill_and_decode(model, prompt, 5, use_graph=False)
    # teacher-forced check: the timed loop fed the greedy tokens and got the full forward's logits
    with torch.no_grad():
        first = model(prompt)[0][:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy after the prompt
        greedy = logits.argmax(-1).T  # (B, 5) greedy after each step
        # the warm-up steps feed the first token WARMUP_STEPS times before the timed steps
        fed = torch.cat([prompt, first.expand(-1, ev.WARMUP_STEPS + 1), greedy[:, :4]], dim=1)
        full, _ = model(fed)
    torch.testing.assert_close(logits, full[:, -5:].float().transpose(0, 1), rtol=1e-4, atol=1e-4)
    result = ev.decode_speed(model, prompt_len=48, batch_size=2, new_tokens=5)
    assert result["decode_tokens_per_s"] == pytest.approx(10 / result["decode_s"])
    assert result["cuda_graph"] is False  # no CUDA graphs on the CPU
    rows = ev.decode_latency(model, [16, 64], batch_size=1, steps=3)
    assert [r["context"] for r in rows] == [16, 64] and all(r["ms_per_token"] > 0 for r in rows)


def test_decode_speed_computes_the_compiled_check_once(monkeypatch):
    """With compile, the compiled step's check logits serve both the CUDA-graph check and the error against
    eager decoding: decode_logits runs once compiled and once eager (the timed runs are stubbed here)."""
    calls = []

    def decode_logits(model, batch_size, compile=False, **kwargs):
        calls.append(compile)
        return torch.full((2, batch_size, 8), 2.0 if compile else 1.0)

    monkeypatch.setattr(ev, "decode_logits", decode_logits)
    monkeypatch.setattr(ev, "prefill_and_decode", lambda *args, **kwargs: (0.5, 0.25, None))
    result = ev.decode_speed(
        tiny_model("nirvana", seed=2), prompt_len=16, batch_size=2, new_tokens=5, compile=True
    )
    assert calls == [True, False]
    assert result["compiled_rel_error"] == pytest.approx(1.0)  # |2 - 1| / |1| from the two stubs
    assert result["ms_per_token"] == pytest.approx(1000 * 0.25 / 5)


def test_speed_command_compiles_the_decode_step(tmp_path, capsys):
    """eval.py speed --compile on the CPU: the compiled step's logits match the eager step's (reported), and
    the table says the step was compiled."""
    argv = [
        "speed",
        "--size",
        "tiny",
        "--variants",
        "gated-deltanet",
        "--prompt-len",
        "16",
        "--new-tokens",
        "3",
    ]
    argv += [
        "--batch-size",
        "1",
        "--contexts",
        "",
        "--backend",
        "torch",
        "--compile",
        "--out-dir",
        str(tmp_path),
    ]
    ev.main(argv)
    assert "decode step under torch.compile" in capsys.readouterr().out
    result = json.loads((tmp_path / "speed_tiny.json").read_text())["speed"]["gated-deltanet"]
    assert result["compile"] is True and result["compiled_rel_error"] < 1e-5


def test_compiled_decode_step_may_not_recompile_after_its_warm_up():
    """A recompile inside a CUDA-graph capture breaks the capture (on a GPU, the token's strides changing
    between the warm-up and the capture did): DecodeStep makes any recompile after its warm-up an error."""
    model = tiny_model("gated-deltanet", seed=1)
    model.setup_caches(2, 16)
    try:
        with torch.no_grad():
            step = ev.DecodeStep(model, 2, compile=True)
            step(torch.tensor([[1], [2]]), 0)
            step.warmed_up = True
            step(torch.tensor([[3], [4]]), 1)  # the same static inputs: no recompile
            step.token = torch.zeros(2, 3, dtype=torch.long)[:, :1]  # (2, 1) with other strides
            with pytest.raises(Exception, match="Recompiling function decode_step"):
                step.run()
    finally:
        model.clear_caches()
