"""The ``heterospec`` CLI under bad input (issue 16).

Every bad command line exits with status 2 and prints one line ``heterospec...: error: ...`` that
names the flag or the limit at fault, never a traceback. Argument errors are found before any
model loads: those cases run with a ``transformers`` (and ``gguf``) on the path that fails on
import, so a case that tried to load a model would end in a traceback and fail. The context-length
cases load a tiny local model (and one the real SmolLM2 GGUF); Ctrl-C exits 130 with one line.
"""
import json
import selectors
import signal
import time

import pytest
import torch

import heterospec as hs
from heterospec.prompts import load_prompts
from heterospec.testing import run_cli, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ARG_TIMEOUT = 120  # seconds per argument-error case (each answers in well under 5 s)

# (id, argv, what the one-line message must contain). Placeholders name files made by `files`.
ARGUMENT_CASES = [
    # --- the cases of issue 16
    ("calibrate-prompts-0", ["calibrate", "--prompts", "0", "--out", "{tmp}/p.json"], "--prompts"),
    ("bench-unknown-set", ["bench", "--sets", "nonexistent"], "--sets"),
    ("bench-prompts-per-set-0", ["bench", "--prompts-per-set", "0"], "--prompts-per-set"),
    ("bench-temperatures-abc", ["bench", "--temperatures", "abc"], "--temperatures"),
    ("generate-top-k-negative", ["generate", "--prompt", "Hi", "--top-k", "-3"], "--top-k"),
    ("generate-threads-0", ["generate", "--prompt", "Hi", "--threads", "0"], "--threads"),
    ("generate-seed-negative", ["generate", "--prompt", "Hi", "--seed", "-1"], "--seed"),
    ("generate-depth-0", ["generate", "--prompt", "Hi", "--depth", "0"], "--depth"),
    ("generate-total-tokens-1", ["generate", "--prompt", "Hi", "--total-tokens", "1"],
     "--total-tokens"),
    ("generate-tree-top-k-0", ["generate", "--prompt", "Hi", "--tree-top-k", "0"], "--tree-top-k"),
    ("generate-tree-top-k-65", ["generate", "--prompt", "Hi", "--tree-top-k", "65"],
     "--tree-top-k"),
    ("generate-tree-top-k-vs-policy", ["generate", "--prompt", "Hi", "--tree-top-k", "5"],
     "--tree-top-k 5"),
    ("policy-six-thresholds", ["generate", "--prompt", "Hi", "--policy", "{six}"],
     "list of 7 numbers"),
    ("generate-temperature-negative", ["generate", "--prompt", "Hi", "--temperature", "-1"],
     "--temperature"),
    ("generate-empty-prompt", ["generate", "--prompt", ""], "--prompt is empty"),
    ("generate-draft-model-missing", ["generate", "--prompt", "Hi", "--draft", "model:/nonexistent"],
     "--draft model:/nonexistent: the draft model path does not exist"),
    # --- the command line itself
    ("no-command", [], "command"),
    ("unknown-command", ["decode"], "invalid choice"),
    ("generate-no-prompt", ["generate"], "--prompt"),
    ("generate-prompt-and-chat", ["generate", "--prompt", "a", "--chat", "b"], "--chat"),
    ("generate-unknown-flag", ["generate", "--prompt", "a", "--frobnicate"], "--frobnicate"),
    # --- sampling and lengths
    ("generate-max-new-tokens-0", ["generate", "--prompt", "Hi", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    ("generate-max-new-tokens-text", ["generate", "--prompt", "Hi", "--max-new-tokens", "many"],
     "--max-new-tokens"),
    ("generate-temperature-nan", ["generate", "--prompt", "Hi", "--temperature", "nan"],
     "--temperature"),
    ("generate-temperature-inf", ["generate", "--prompt", "Hi", "--temperature", "inf"],
     "--temperature"),
    ("generate-top-p-0", ["generate", "--prompt", "Hi", "--top-p", "0"], "--top-p"),
    ("generate-top-p-above-1", ["generate", "--prompt", "Hi", "--top-p", "1.5"], "--top-p"),
    ("generate-top-k-huge", ["generate", "--prompt", "Hi", "--top-k", "99999999999"], "--top-k"),
    ("generate-seed-above-64-bit", ["generate", "--prompt", "Hi", "--seed", str(2**64)], "--seed"),
    ("generate-empty-chat", ["generate", "--chat", "  "], "--chat is empty"),
    # bytes 0xff 0xfe on the command line (argv decodes them as surrogate escapes)
    ("generate-prompt-not-utf8", ["generate", "--prompt", "\udcff\udcfe"], "not valid UTF-8"),
    ("generate-truncate-unknown", ["generate", "--prompt", "Hi", "--truncate-prompt", "right"],
     "--truncate-prompt"),
    # --- model, draft, device
    ("generate-model-missing", ["generate", "--prompt", "Hi", "--model", "{tmp}/none.gguf"],
     "--model: model path does not exist"),
    ("generate-draft-unknown", ["generate", "--prompt", "Hi", "--draft", "int4"], "--draft"),
    ("generate-draft-empty-path", ["generate", "--prompt", "Hi", "--draft", "model:"], "--draft"),
    ("generate-eagle3-dir-missing", ["generate", "--prompt", "Hi", "--draft", "eagle3:{tmp}/none"],
     "--draft eagle3:"),
    ("generate-dtype-unknown", ["generate", "--prompt", "Hi", "--dtype", "int8"], "--dtype"),
    ("generate-device-unknown", ["generate", "--prompt", "Hi", "--device", "tpu"], "--device"),
    ("generate-device-mps", ["generate", "--prompt", "Hi", "--device", "mps"],
     "--device mps: heterospec's kernels run on cpu and cuda only"),
    ("generate-device-cuda-99", ["generate", "--prompt", "Hi", "--device", "cuda:99"],
     "--device cuda:99"),
    ("generate-cuda-graphs-on-cpu", ["generate", "--prompt", "Hi", "--cuda-graphs"],
     "--cuda-graphs needs --device cuda"),
    # --- policy files
    ("policy-missing", ["generate", "--prompt", "Hi", "--policy", "{tmp}/none.json"],
     "--policy: policy file not found"),
    ("policy-not-json", ["generate", "--prompt", "Hi", "--policy", "{badjson}"], "not valid JSON"),
    ("policy-wrong-format", ["generate", "--prompt", "Hi", "--policy", "{notpolicy}"],
     "--policy: "),
    ("policy-text-thresholds", ["generate", "--prompt", "Hi", "--policy", "{textthr}"],
     "list of 7 numbers"),
    # --- calibrate
    ("calibrate-policy-not-static", ["calibrate", "--policy", "heterospec", "--out", "{tmp}/p.json"],
     "--policy"),
    ("calibrate-offset-negative", ["calibrate", "--offset", "-1", "--out", "{tmp}/p.json"],
     "--offset"),
    ("calibrate-max-prompt-tokens-0",
     ["calibrate", "--max-prompt-tokens", "0", "--out", "{tmp}/p.json"], "--max-prompt-tokens"),
    ("calibrate-min-samples-leaf-0",
     ["calibrate", "--min-samples-leaf", "0", "--out", "{tmp}/p.json"], "--min-samples-leaf"),
    ("calibrate-out-is-a-directory", ["calibrate", "--out", "{adir}"], "--out"),
    ("calibrate-out-under-a-file", ["calibrate", "--out", "{afile}/p.json"], "--out"),
    ("calibrate-out-missing", ["calibrate"], "--out"),
    # --- train-draft
    ("train-no-data", ["train-draft", "--out", "{tmp}/h", "--max-tokens", "0",
                       "--regenerate-tokens", "0"], "--max-tokens must be > 0"),
    ("train-max-len-0", ["train-draft", "--out", "{tmp}/h", "--max-len", "0"], "--max-len"),
    ("train-epochs-0", ["train-draft", "--out", "{tmp}/h", "--epochs", "0"], "--epochs"),
    ("train-ttt-steps-0", ["train-draft", "--out", "{tmp}/h", "--ttt-steps", "0"], "--ttt-steps"),
    ("train-batch-tokens-0", ["train-draft", "--out", "{tmp}/h", "--batch-tokens", "0"],
     "--batch-tokens"),
    ("train-draft-vocab-0", ["train-draft", "--out", "{tmp}/h", "--draft-vocab", "0"],
     "--draft-vocab"),
    ("train-lr-0", ["train-draft", "--out", "{tmp}/h", "--lr", "0"], "--lr"),
    ("train-lr-nan", ["train-draft", "--out", "{tmp}/h", "--lr", "nan"], "--lr"),
    ("train-save-dtype-unknown", ["train-draft", "--out", "{tmp}/h", "--save-dtype", "int8"],
     "--save-dtype"),
    ("train-out-is-a-file", ["train-draft", "--out", "{afile}"], "--out"),
    ("train-work-dir-is-a-file", ["train-draft", "--out", "{tmp}/h", "--work-dir", "{afile}"],
     "--work-dir"),
    ("train-init-from-missing", ["train-draft", "--out", "{tmp}/h", "--init-from", "{tmp}/none"],
     "--init-from"),
    # --- bench
    ("bench-repeats-0", ["bench", "--repeats", "0"], "--repeats"),
    ("bench-unknown-method", ["bench", "--methods", "ar,medusa"], "--methods"),
    ("bench-heterospec-with-static-policy", ["bench", "--methods", "ar,heterospec", "--policy",
                                             "static"], "--methods heterospec/ded"),
    ("bench-hf-assisted-with-eagle3", ["bench", "--methods", "ar,hf_assisted", "--draft", "eagle3"],
     "--methods hf_assisted"),
    ("bench-tuned-static-two-numbers", ["bench", "--tuned-static", "2,6"], "--tuned-static"),
    ("bench-tuned-static-depth-0", ["bench", "--tuned-static", "0,6,16"], "--tuned-static"),
    ("bench-prompt-offset-negative", ["bench", "--prompt-offset", "-1"], "--prompt-offset"),
    ("bench-prompt-offset-past-the-set", ["bench", "--sets", "humaneval", "--prompt-offset", "164"],
     "--prompt-offset 164"),
    ("bench-more-prompts-than-the-set", ["bench", "--sets", "mtbench", "--prompts-per-set", "81"],
     "--prompts-per-set 81"),
    ("bench-temperatures-repeated", ["bench", "--temperatures", "0,0.0"], "--temperatures"),
    ("bench-temperatures-empty-item", ["bench", "--temperatures", "0,,1"], "--temperatures"),
    ("bench-temperatures-negative", ["bench", "--temperatures", "0,-1"], "--temperatures"),
    ("bench-sets-empty", ["bench", "--sets", ""], "--sets"),
    ("bench-out-json-is-a-directory", ["bench", "--out-json", "{adir}"], "--out-json"),
    ("bench-figure-under-a-file", ["bench", "--figure", "{afile}/f.png"], "--figure"),
]
if torch.version.cuda is None:  # the case, on a CPU-only torch like CI's
    ARGUMENT_CASES.append(("generate-device-cuda-cpu-torch",
                           ["generate", "--prompt", "Hi", "--device", "cuda"],
                           "--device cuda: this torch"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases refer to, and a directory whose transformers/gguf fail on import."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    policy = json.loads(open(hs.DEFAULT_POLICY_FILE, encoding="utf-8").read())
    paths = {"tmp": str(tmp), "afile": str(tmp / "a_file"), "adir": str(tmp / "a_dir")}
    (tmp / "a_file").write_text("x")
    (tmp / "a_dir").mkdir()
    for name, content in (
            ("six", json.dumps({**policy, "thresholds": policy["thresholds"][:6]})),
            ("textthr", json.dumps({**policy, "thresholds": ["1"] * 7})),
            ("badjson", "[1, 2"),
            ("notpolicy", json.dumps({"thresholds": [1] * 7}))):
        (tmp / f"{name}.json").write_text(content)
        paths[name] = str(tmp / f"{name}.json")
    for module in ("transformers", "gguf"):
        (tmp / "no_model" / module).mkdir(parents=True)
        (tmp / "no_model" / module / "__init__.py").write_text(
            f"raise ImportError('{module} imported: this case tried to load a model')\n")
    paths["no_model"] = str(tmp / "no_model")
    return paths


def assert_one_line_error(proc, needle, only_line=True):
    """Exit 2, no traceback, and the error is one line that contains ``needle``."""
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if only_line:
        assert len(lines) == 1, err[-3000:]
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-3000:]
    assert errors[0].startswith("heterospec"), errors[0]
    assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.mark.parametrize("argv,needle", [pytest.param(a, n, id=i) for i, a, n in ARGUMENT_CASES])
def test_bad_arguments_fail_in_one_line_before_any_model_loads(files, argv, needle):
    argv = [a.format(**files) for a in argv]
    proc = run_cli(*argv, timeout=ARG_TIMEOUT, path_first=[files["no_model"]])
    assert_one_line_error(proc, needle)


def test_the_no_model_guard_catches_a_model_load(files):
    """The guard of the cases above works: a valid command does try to import transformers and
    so fails there (exit 1, a traceback naming the guard)."""
    proc = run_cli("generate", "--prompt", "Hi", "--max-new-tokens", "1", timeout=ARG_TIMEOUT,
                   path_first=[files["no_model"]])
    assert proc.returncode == 1 and "this case tried to load a model" in proc.stderr, \
        proc.stderr[-3000:]


def test_help_exits_0():
    proc = run_cli("generate", "--help", timeout=ARG_TIMEOUT)
    assert proc.returncode == 0 and "--truncate-prompt" in proc.stdout, proc.stderr


# ----------------------------------------------------------------------------- the driver extra


def _without_distributions(monkeypatch, *missing):
    """Makes ``importlib.metadata`` report the ``missing`` distributions as not installed, as
    after a kernels-only ``pip install heterospec``."""
    import importlib.metadata

    real = importlib.metadata.distribution

    def distribution(name):
        if name in missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_the_driver_extra_is_installed_here():
    from heterospec.driver_extra import driver_distributions, missing_extra_message

    assert {"transformers", "accelerate", "gguf"} <= set(driver_distributions())
    assert missing_extra_message() is None


@pytest.mark.parametrize("argv", [
    pytest.param(["generate", "--prompt", "hi"], id="generate"),
    pytest.param(["bench", "--prompts-per-set", "1"], id="bench"),
    pytest.param(["calibrate", "--prompts", "2", "--out", "p.json"], id="calibrate"),
    pytest.param(["train-draft", "--out", "head"], id="train-draft"),
])
def test_without_the_driver_extra_the_command_names_it(monkeypatch, capsys, argv):
    """Without the driver's dependencies every command ends in one line that names the missing
    distributions and the extra to install, before anything imports them."""
    from heterospec import cli

    _without_distributions(monkeypatch, "accelerate", "gguf")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("heterospec: error: "), lines[0]
    assert "gguf, accelerate missing" in lines[0], lines[0]
    assert "pip install \"heterospec[driver]\"" in lines[0], lines[0]


def test_help_needs_no_driver_extra(monkeypatch, capsys):
    from heterospec import cli

    _without_distributions(monkeypatch, "transformers")
    assert cli.main(["generate", "--help"]) == 0
    assert "--truncate-prompt" in capsys.readouterr().out


# ----------------------------------------------------------------------------- prompt loaders


def test_prompt_loaders_terminate_on_zero_and_reject_bad_counts():
    """``load_prompts('sharegpt', 0)`` used to double a zero limit forever: run in a subprocess
    with a timeout so a regression fails instead of hanging the suite."""
    code = ("from heterospec.prompts import load_prompts\n"
            "print([len(load_prompts(s, 0)) for s in ('sharegpt', 'humaneval', 'gsm8k', "
            "'mtbench')], len(load_prompts('sharegpt', 2, offset=3)))")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["[0,", "0,", "0,", "0]", "2"], \
        proc.stdout + proc.stderr[-2000:]
    with pytest.raises(hs.DataError, match="unknown prompt set"):
        load_prompts("nonexistent", 1)
    with pytest.raises(hs.DataError, match="must be >= 0"):
        load_prompts("humaneval", -1)
    assert load_prompts("humaneval", 5, offset=164) == []  # past the end: empty, not an error


# ----------------------------------------------------------------------------- policy blame


def test_policy_file_errors_and_override_errors_are_told_apart(files):
    with pytest.raises(hs.PolicyFileError, match="list of 7 numbers"):
        hs.load_policy(files["six"])
    with pytest.raises(hs.PolicyFileError, match="list of 7 numbers"):
        hs.load_policy(files["textthr"])
    policy = json.loads(open(hs.DEFAULT_POLICY_FILE, encoding="utf-8").read())
    # the shipped file is fine; an override that does not fit it is the caller's error
    with pytest.raises(hs.GenerationConfigError) as info:
        hs.load_policy(hs.DEFAULT_POLICY_FILE, top_k=policy["top_k"] + 1)
    assert not isinstance(info.value, hs.PolicyFileError)
    assert hs.load_policy(hs.DEFAULT_POLICY_FILE, depth=2).depth == 2


# ----------------------------------------------------------------------------- context length


CONTEXT = 64  # the tiny model's max_position_embeddings
TREE = ["--policy", "static", "--depth", "2", "--tree-top-k", "2", "--total-tokens", "5"]


def _save_tiny_model(path, context):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(64, seed=1)
    model.config.max_position_embeddings = context
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w2").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with a 64-token context and a word-level tokenizer (``w0`` .. ``w63``)."""
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_ctx"), CONTEXT)


def _words(n):
    """``n`` words that are one token each (w3..w19: "w2x" would split after the special "w2")."""
    return " ".join(f"w{3 + i % 17}" for i in range(n))


@pytest.mark.parametrize("argv,needle", [
    pytest.param(["generate", "--prompt", _words(60), "--max-new-tokens", "4"],
                 "exceed the 64-token context", id="generate-prompt-too-long"),
    pytest.param(["generate", "--prompt", _words(10), "--max-new-tokens", "60",
                  "--truncate-prompt", "left"], "lower --max-new-tokens",
                 id="generate-no-room-even-truncated"),
    pytest.param(["bench", "--sets", "gsm8k", "--methods", "ar,static", "--max-new-tokens", "40"],
                 "--truncate-prompt left", id="bench-prompt-too-long"),
    pytest.param(["calibrate", "--max-prompt-tokens", "60", "--prompts", "1", "--out",
                  "{tmp}/p.json"], "--max-prompt-tokens", id="calibrate-prompt-too-long"),
    pytest.param(["train-draft", "--max-len", "100", "--out", "{tmp}/head"],
                 "--max-len 100 exceeds the 64-token context", id="train-max-len-too-long"),
])
def test_context_length_is_checked_after_loading(files, tiny_model_dir, argv, needle):
    argv = [a.format(**files) for a in argv] + ["--model", tiny_model_dir, "--threads", "1"]
    if argv[0] != "train-draft":
        argv += TREE
    proc = run_cli(*argv, timeout=300)
    assert_one_line_error(proc, needle, only_line=False)


def test_truncate_prompt_left_keeps_the_last_tokens_that_fit(tiny_model_dir):
    words = _words(100)
    proc = run_cli("generate", "--model", tiny_model_dir, "--prompt", words, "--max-new-tokens",
                   "4", "--truncate-prompt", "left", "--json", "--no-eos", "--threads", "1", *TREE,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    room = CONTEXT - 4 - 5
    assert out["prompt_tokens"] == room and len(out["token_ids"]) == 4
    assert f"kept the prompt's last {room} of 100 tokens" in proc.stderr
    # the same as giving only those last tokens
    same = run_cli("generate", "--model", tiny_model_dir, "--prompt",
                   " ".join(words.split()[-room:]), "--max-new-tokens", "4", "--json",
                   "--no-eos", "--threads", "1", *TREE, timeout=300)
    assert same.returncode == 0 and json.loads(same.stdout)["token_ids"] == out["token_ids"]


def test_library_generators_check_the_context_too():
    model = tiny_llama(64, seed=1)
    model.config.max_position_embeddings = CONTEXT
    target = hs.CausalLM(model)
    assert target.context_length == CONTEXT
    gen = hs.SpeculativeGenerator(target, hs.ModelDrafter(hs.CausalLM(model), top_k=2),
                                  hs.StaticTree(depth=2, top_k=2, total_tokens=5))
    prompt = list(range(3, 3 + CONTEXT - 10))
    assert len(gen.generate(prompt, 5).token_ids) == 5  # 54 + 5 + 5 = 64: fits exactly
    with pytest.raises(hs.ContextLengthError, match="= 65 exceed the 64-token context"):
        gen.generate(prompt, 6)
    with pytest.raises(hs.ContextLengthError, match="= 65 exceed"):
        hs.autoregressive_generate(target, prompt, 11)


def test_context_length_of_configs():
    from transformers import GPT2Config, LlamaConfig

    from heterospec.target import context_length

    assert context_length(LlamaConfig(max_position_embeddings=777)) == 777
    assert context_length(GPT2Config(n_positions=321)) == 321

    class NoLimit:
        pass

    assert context_length(NoLimit()) is None


def test_real_model_rejects_a_prompt_longer_than_its_8k_context():
    """Issue 16's case: ~10k tokens with --max-new-tokens 4 on SmolLM2-135M (8192 positions,
    read from the GGUF's config) ends in one line instead of minutes at 6-8 GB."""
    proc = run_cli("generate", "--prompt", "hello world " * 5000, "--max-new-tokens", "4",
                   "--threads", "1", timeout=600)
    line = assert_one_line_error(proc, "exceed the 8192-token context", only_line=False)
    assert "--truncate-prompt left" in line and "(10001 tokens)" in line


# ----------------------------------------------------------------------------- Ctrl-C


def test_long_inputs_run_in_chunks_with_the_same_result():
    """A prefill longer than PREFILL_CHUNK runs as forwards of at most that many tokens (so no
    single kernel runs long and Ctrl-C is seen promptly), with the logits, KV cache and captured
    hidden states of one whole forward up to float rounding."""
    from heterospec.target import PREFILL_CHUNK

    whole, chunked = (hs.CausalLM(tiny_llama(64, seed=2, layers=4)) for _ in range(2))
    for lm in (whole, chunked):
        lm.capture_hidden_states([0, 2])
    sizes = []
    chunked.model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[1]), with_kwargs=True)
    n = 2 * PREFILL_CHUNK + 37
    ids = torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(0))
    cache_whole, cache_chunked = whole.new_cache(), chunked.new_cache()
    ref = whole.causal_forward(ids, cache_whole, chunk=n)
    ref_hidden = whole.captured_hidden
    out = chunked.causal_forward(ids, cache_chunked)
    assert sizes == [PREFILL_CHUNK, PREFILL_CHUNK, 37]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.captured_hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    for a, b in zip(cache_chunked.layers, cache_whole.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
    last = chunked.causal_forward(ids, chunked.new_cache(), last_only=True)
    torch.testing.assert_close(last, ref[-1:], rtol=1e-4, atol=1e-4)


def test_ctrl_c_exits_130_in_one_line(tmp_path):
    """SIGINT while tokens stream: exit 130 within seconds, one line, no traceback."""
    model_dir = _save_tiny_model(tmp_path / "long_ctx", 1 << 20)
    proc = run_cli("generate", "--model", model_dir, "--prompt", "w5 w9 w30", "--max-new-tokens",
                   "500000", "--no-eos", "--threads", "1", *TREE, popen=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=240), "no token streamed within 240 s"
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "heterospec: interrupted", \
        err[-3000:]
    assert waited < 10, f"exited {waited:.1f} s after SIGINT"
