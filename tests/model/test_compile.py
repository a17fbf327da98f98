"""Compiled blocks (model.parallel.apply_compile, --compile) compute what eager blocks compute:
the same losses and gradients, on packed sequences with activation checkpointing and on MoE
blocks, through the SFT loop, and the sampler (whose cached calls stay eager) draws the same tokens.
Compilation on this CPU takes tens of seconds per block structure: these tests compile as few
structures as they can."""
import json

import pytest
import torch

import train
from model.config import ModelConfig
from model.parallel import apply_activation_checkpointing, apply_compile
from model.transformer import Transformer
from tests.model.conftest import TINY, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loss_and_grads(model, ids, cu_seqlens=None):
    model.zero_grad(set_to_none=True)
    pos = None
    if cu_seqlens is not None:   # one packed row: positions restart at every document
        pos = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])])[None]
    hidden = model.forward_hidden(ids, position_ids=pos, cu_seqlens=cu_seqlens)
    loss = torch.nn.functional.cross_entropy((hidden[0] @ model.output_weight.T).float(), ids[0].roll(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3-moe"])
def test_compiled_blocks_equal_eager_with_checkpointing_on_packed_rows(kind):
    config = ModelConfig(**TINY[kind])
    eager = random_model(config, seed=1)
    compiled = Transformer(config)
    compiled.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(eager)
    apply_activation_checkpointing(compiled)
    apply_compile(compiled)
    g = torch.Generator().manual_seed(0)
    for lengths in ([13, 20], [7, 30, 11]):        # two token counts: one compile serves both (dynamic)
        ids = torch.randint(0, config.vocab_size, (1, sum(lengths)), generator=g)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        la, ga = _loss_and_grads(eager, ids, cu)
        lb, gb = _loss_and_grads(compiled, ids, cu)
        assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6), (kind, lengths, la, lb)
        assert ga.keys() == gb.keys()
        for name in ga:
            assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6), (kind, name)
    # the module tree and the state dict's names are untouched (checkpoints keep HF names)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_the_sampler_runs_eagerly_on_a_compiled_model():
    from sampling.sampler import Sampler, SamplingParams

    config = ModelConfig(**TINY["qwen2"])
    eager = random_model(config, seed=2).eval()
    compiled = Transformer(config).eval()
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3)
    prompts = [[5, 6, 7], [9, 10]]
    a = Sampler(eager, max_batch_size=4, max_seq_len=32, verbose=False).generate(prompts, params)
    b = Sampler(compiled, max_batch_size=4, max_seq_len=32, verbose=False).generate(prompts, params)
    assert [[c.token_ids for c in row] for row in a] == [[c.token_ids for c in row] for row in b]


def test_sft_loop_with_compile_on_equals_compile_off(tmp_path):
    from data.tasks import pretraining_corpus, write_jsonl
    from data.tokenizer import Tokenizer

    rows = pretraining_corpus("arithmetic", 60, seed=1, carry_bug=0.0, wrong_answer=0.0, missing_tags=0.0, digits=2)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], tmp_path / "sft.jsonl")
    Tokenizer.train([r["text"] for r in rows], vocab_size=320).save(tmp_path / "tok")
    flags = ["--stage", "sft", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--chat-template", "r1-zero",
             "--data", str(tmp_path / "sft.jsonl"), "--max-steps", "3", "--warmup-steps", "0", "--batch-size", "8",
             "--micro-batch-size", "4", "--seq-len", "256", "--log-every-s", "60"]
    assert train.main([*flags, "--out", str(tmp_path / "off"), "--compile", "off"]) == 0
    assert train.main([*flags, "--out", str(tmp_path / "on"), "--compile", "on"]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = losses(tmp_path / "off"), losses(tmp_path / "on")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(y / x - 1) <= 1e-5, (a, b)


def test_new_document_counts_and_lengths_compile_nothing_new():
    """Packed micro-batches differ in their number of documents and their lengths every step: after
    the first forward+backward (and the first no-grad forward), none of them compiles again (the
    per-document attention loop runs eagerly inside the compiled block)."""
    from torch._dynamo.utils import counters

    config = ModelConfig(**TINY["qwen2"])
    model = random_model(config, seed=4)
    apply_compile(model)
    g = torch.Generator().manual_seed(1)

    def step(lengths):
        ids = torch.randint(0, config.vocab_size, (1, sum(lengths)), generator=g)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        with torch.no_grad():
            model.forward_hidden(ids, cu_seqlens=cu)
        _loss_and_grads(model, ids, cu)

    step([9, 14])
    frames = counters["stats"]["unique_graphs"]
    for lengths in ([5, 7, 11, 3], [30], [4, 4, 4, 4, 4, 4, 4, 4, 9], [17, 2, 21]):
        step(lengths)
    assert counters["stats"]["unique_graphs"] == frames, "a new document count or length compiled a new graph"


def test_compile_auto_compiles_long_runs_of_wide_models_and_cuda_runs_only():
    from model.build import COMPILE_MIN_HIDDEN_CPU, COMPILE_MIN_STEPS, compile_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tiny = ModelConfig(**TINY["qwen2"])
    wide = ModelConfig(**{**TINY["qwen2"], "hidden_size": COMPILE_MIN_HIDDEN_CPU, "head_dim": 16})
    assert not compile_enabled("auto", cpu, tiny, 10_000)            # the tiny recipes stay eager
    assert compile_enabled("auto", cpu, wide, COMPILE_MIN_STEPS)
    assert not compile_enabled("auto", cpu, wide, COMPILE_MIN_STEPS - 1)  # too short to pay the warm-up
    assert compile_enabled("auto", cuda, tiny, COMPILE_MIN_STEPS)
    assert not compile_enabled("auto", cuda, tiny, COMPILE_MIN_STEPS - 1)
    assert compile_enabled("on", cpu, tiny, 1) and not compile_enabled("off", cuda, wide, 10_000)
    with pytest.raises(ValueError, match="--compile 'yes'"):
        compile_enabled("yes", cpu, tiny, 100)
